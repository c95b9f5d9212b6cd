"""Chunk shaping: the first text is never held, later text at most `coalesce_ms`, earlier at
`min_chars` cut at a boundary, flushed by the terminal frame (a mid-stream error included: held
text is delivered, then the error), composed with the moderation hold-back, and overridable per
request on both HTTP endpoints and over gRPC."""

from __future__ import annotations

import itertools
import time
from typing import Any

import aiohttp
import openai
import pytest

from promptline.devtools.sse_client import collect, without_comments
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2, prompt_pb2
from services.llm_engine.shaping import MAX_HELD_CHARS, Shape, Shaper
from tests.chain import chain_fixture, running_chain
from tests.conftest import make_config
from tests.grpc_calls import read_all

AUTH = {"Authorization": "Bearer dev-key"}
GRPC_AUTH = (("authorization", "Bearer dev-key"),)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu "


# --- the rules, on the shaper alone (explicit clock) ---------------------------------------------


def test_the_first_text_is_never_held() -> None:
    shaper = Shaper(Shape(coalesce_ms=1000, min_chars=100))
    assert shaper.feed("Hel", 1, now=0.0) == ("Hel", 1)
    assert shaper.wait(0.0) is None  # nothing held


def test_later_text_is_held_at_most_coalesce_ms() -> None:
    shaper = Shaper(Shape(coalesce_ms=50))
    shaper.feed("a", 1, now=0.0)
    assert shaper.feed("b", 1, now=1.0) is None
    assert shaper.feed("c", 2, now=1.03) is None
    assert shaper.wait(1.03) == pytest.approx(0.02)  # the oldest held text's deadline
    assert shaper.due(1.04) is None
    assert shaper.due(1.05) == ("bc", 3)
    assert shaper.wait(1.05) is None
    # a chunk arriving after its predecessor's deadline takes both out at once
    shaper.feed("d", 1, now=2.0)
    assert shaper.feed("e", 1, now=2.2) == ("de", 2)


def test_min_chars_sends_early_cut_at_the_boundary() -> None:
    anywhere = Shaper(Shape(coalesce_ms=500, min_chars=6))
    anywhere.feed("x", 1, now=0.0)
    assert anywhere.feed("abc", 1, now=0.1) is None
    assert anywhere.feed("defg", 1, now=0.1) == ("abcdefg", 2)

    words = Shaper(Shape(coalesce_ms=500, min_chars=4, boundary="word"))
    words.feed("x", 1, now=0.0)
    # "tw" waits for its word's end; a chunk's tokens go with the frame that ends it
    assert words.feed("one tw", 2, now=0.1) == ("one ", 0)
    assert words.feed("o ", 1, now=0.12) == ("two ", 3)
    assert words.feed("a fo", 2, now=0.13) is None  # "a " alone is under min_chars
    assert words.flush() == ("a fo", 2)

    lines = Shaper(Shape(coalesce_ms=500, min_chars=1, boundary="line"))
    lines.feed("x", 1, now=0.0)
    assert lines.feed("no newline yet", 3, now=0.1) is None  # min_chars met, no boundary
    assert lines.feed(" end\nnext", 2, now=0.2) == ("no newline yet end\n", 3)
    assert lines.due(0.6) == ("next", 2)  # the hold still bounds what has no boundary


def test_held_text_is_capped_in_size() -> None:
    shaper = Shaper(Shape(coalesce_ms=1000))
    shaper.feed("x", 1, now=0.0)
    assert shaper.feed("y" * (MAX_HELD_CHARS - 1), 5, now=0.1) is None
    assert shaper.feed("z", 1, now=0.1) == ("y" * (MAX_HELD_CHARS - 1) + "z", 6)


def test_request_overrides_only_what_it_sets() -> None:
    model = Shape(coalesce_ms=50, min_chars=10, boundary="word")
    assert model.with_overrides(None) == model
    assert model.with_overrides(common_pb2.StreamShape(coalesce_ms=0)) == Shape(0, 10, "word")
    assert model.with_overrides(common_pb2.StreamShape(boundary="line")) == Shape(50, 10, "line")


# --- through the chain ---------------------------------------------------------------------------


def shaped(name: str, stream: dict[str, Any], **simulated: Any) -> dict[str, Any]:
    return {"name": name, "provider": "simulated", "stream": stream,
            "simulated": {"ttft_ms": 0, "tokens_per_second": 100, "reply": WORDS * 3,
                          **simulated}}


MODELS = [
    shaped("held", {"coalesce_ms": 200}),
    shaped("plain", {"coalesce_ms": 0}),
    shaped("words", {"coalesce_ms": 1000, "min_chars": 20, "boundary": "word"}),
    shaped("failing", {"coalesce_ms": 1000}, fail_after_tokens=10),
    shaped("moderated", {"coalesce_ms": 1000},
           reply="a clean start, then the forbidden-word comes"),
]


chain = chain_fixture(models=MODELS)


async def grpc_frames(chain: Any, model: str, **kw: Any) -> list[Any]:
    return await read_all(chain.prompt_stub.StreamChat(prompt_pb2.StreamChatRequest(
        model=model, messages=[common_pb2.ChatMessage(role="user", content="hi")], **kw),
        metadata=GRPC_AUTH, timeout=20))


def deltas(frames: list[Any]) -> list[Any]:
    return [f.delta for f in frames if f.HasField("delta")]


async def test_shaped_stream_first_text_at_once_then_bounded_frames(chain: Any) -> None:
    call = chain.prompt_stub.StreamChat(prompt_pb2.StreamChatRequest(
        model="held", messages=[common_pb2.ChatMessage(role="user", content="hi")]),
        metadata=GRPC_AUTH, timeout=20)
    arrivals: list[tuple[float, Any]] = []
    async for frame in call:
        arrivals.append((time.monotonic(), frame))
    frames = [f for _, f in arrivals]
    times = [t for t, f in arrivals if f.HasField("delta")]
    # the first text leaves with `start`, not a hold (200 ms) later
    assert times[0] - arrivals[0][0] < 0.1
    parts = deltas(frames)
    assert "".join(d.text for d in parts) == WORDS * 3
    assert sum(d.tokens for d in parts) == frames[-1].done.usage.completion_tokens
    plain = deltas(await grpc_frames(chain, "plain"))
    assert len(parts) * 3 <= len(plain)  # ~20 tokens per 200 ms hold at 100 tokens/s
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.2 + 0.25


async def test_min_chars_cuts_after_whole_words(chain: Any) -> None:
    parts = deltas(await grpc_frames(chain, "words"))
    assert "".join(d.text for d in parts) == WORDS * 3
    for part in parts[1:-1]:  # the first is the first token; the last is the flush
        assert len(part.text) >= 20 and part.text.endswith(" "), part.text


async def test_a_mid_stream_error_delivers_the_held_text_first(chain: Any) -> None:
    frames = await grpc_frames(chain, "failing")
    text = "".join(d.text for d in deltas(frames))
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage) == (ErrorCode.UPSTREAM_ERROR, Stage.MID_STREAM)
    # the first token, then the 9 held ones, delivered before the error frame
    assert len(deltas(frames)) == 2 and sum(d.tokens for d in deltas(frames)) == 10
    assert (WORDS * 3).startswith(text)


async def test_shaping_never_releases_a_held_back_term(chain: Any) -> None:
    frames = await grpc_frames(chain, "moderated")
    text = "".join(d.text for d in deltas(frames))
    err = PromptlineError.from_pb(frames[-1].error)
    assert err.code is ErrorCode.MODERATION_BLOCKED and err.stage is Stage.MID_STREAM
    assert "forb" not in text and "a clean start, then the forbidden-word".startswith(text)


@pytest.mark.parametrize("endpoint", ["native", "openai", "grpc"])
async def test_each_endpoint_overrides_the_models_shaping(chain: Any, endpoint: str) -> None:
    # "held" coalesces by default: asking for 0 gives a frame per token...
    off = await pieces(chain, endpoint, "held", {"coalesce_ms": 0})
    # ...and "plain" shapes when asked to
    on = await pieces(chain, endpoint, "plain", {"coalesce_ms": 1000, "min_chars": 40})
    assert "".join(off) == "".join(on) == WORDS * 3
    assert len(off) >= 30 and len(on) <= 8, (len(off), len(on))


async def pieces(chain: Any, endpoint: str, model: str, shape: dict[str, Any]) -> list[str]:
    if endpoint == "grpc":
        return [d.text for d in deltas(await grpc_frames(
            chain, model, stream_shape=common_pb2.StreamShape(**shape)))]
    if endpoint == "openai":
        async with openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key="dev-key",
                                      max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": False, **shape})  # type: ignore[typeddict-item]
            return [c.choices[0].delta.content async for c in stream
                    if c.choices and c.choices[0].delta.content]
    async with aiohttp.ClientSession() as http, http.post(
            f"{chain.base_url}/v1/chat/stream", headers=AUTH, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}],
                "stream_options": shape}) as resp:
        events = without_comments(await collect(resp))
    return [e.data["text"] for e in events if e.event == "delta"]


@pytest.mark.parametrize(("shape", "message"), [
    ({"coalesce_ms": 5000}, "stream_options.coalesce_ms must be between 0 and 1000"),
    ({"min_chars": -1}, "stream_options.min_chars must be between 0"),
    ({"boundary": "paragraph"}, "stream_options.boundary must be one of none, word, line"),
    ({"coalesce_ms": "50"}, "stream_options.coalesce_ms must be an integer"),
    ("fast", "stream_options must be an object"),
])
async def test_a_bad_shape_is_a_clear_400(chain: Any, shape: Any, message: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{chain.base_url}/v1/chat/stream", headers=AUTH, json={
                "model": "plain", "messages": [{"role": "user", "content": "hi"}],
                "stream_options": shape}) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    assert message in body["error"]["message"], body


async def test_a_bad_shape_over_grpc_is_invalid_request(chain: Any) -> None:
    frames = await grpc_frames(chain, "plain",
                               stream_shape=common_pb2.StreamShape(boundary="sentence"))
    err = PromptlineError.from_pb(frames[-1].error)
    assert err.code is ErrorCode.INVALID_REQUEST and "boundary" in err.message


async def test_the_engine_reads_the_provider_once_per_hold(redis_server: Any) -> None:
    """Shaping at the source: after the first text, an OpenAI-compatible provider's socket is
    read once per `coalesce_ms`, each read a frame (60 tokens 20 ms apart, a 200 ms hold: ~7
    frames, not 60), every token in order."""
    from promptline.devtools.fake_openai import FakeOpenAI, model_name, reply_text

    async with FakeOpenAI() as upstream:
        config = make_config(redis_url=redis_server.url, models=[{
            "name": "up", "provider": "openai", "base_url": upstream.base_url,
            "upstream_model": model_name(60, 20), "stream": {"coalesce_ms": 200}}])
        async with running_chain(config, with_edge=False) as chain:
            frames = await grpc_frames(chain, "up")
    parts = deltas(frames)
    assert "".join(d.text for d in parts) == reply_text(60)
    assert sum(d.tokens for d in parts) == 60
    assert len(parts) <= 1 + 1.2 / 0.2 + 2, [d.text for d in parts]


@pytest.mark.parametrize("provider", ["openai", "simulated"])
async def test_the_end_of_a_paced_reply_is_not_held(redis_server: Any, provider: str) -> None:
    """The hold ends when the provider's reply does: 10 tokens 20 ms apart under a 1 s hold
    take their ~0.2 s, not the hold's 1 s: the first text at once, the rest in one frame as the
    reply ends, then done."""
    from promptline.devtools.fake_openai import FakeOpenAI, model_name, reply_text

    hold = {"coalesce_ms": 1000}
    async with FakeOpenAI() as upstream:
        model = ({"name": "up", "provider": "openai", "base_url": upstream.base_url,
                  "upstream_model": model_name(10, 20), "stream": hold} if provider == "openai"
                 else {"name": "up", "provider": "simulated", "stream": hold, "simulated": {
                     "ttft_ms": 0, "tokens_per_second": 50, "reply": reply_text(10)}})
        config = make_config({"moderation": {"blocked_terms": []}},
                             redis_url=redis_server.url, models=[model])
        async with running_chain(config, with_edge=False) as chain:
            started = time.monotonic()
            frames = await grpc_frames(chain, "up")
            took = time.monotonic() - started
    parts = deltas(frames)
    assert "".join(d.text for d in parts) == reply_text(10)
    assert frames[-1].WhichOneof("frame") == "done"
    assert len(parts) == 2, [d.text for d in parts]
    assert 0.15 < took < 0.8, took  # the reply's own time, well under the 1 s hold


async def test_a_provider_connection_lost_mid_hold_is_unavailable_at_once(
        redis_server: Any) -> None:
    """The documented rule (docs/failure-handling.md, provider errors): a connection lost during
    a hold cuts it short: UNAVAILABLE at mid_stream as the connection goes (8 tokens 20 ms
    apart: ~0.16 s), not at the 1 s hold's next read; what the caller got is a prefix of the
    reply, the first text at least."""
    from promptline.devtools.fake_openai import FakeOpenAI, model_name, reply_text

    async with FakeOpenAI() as upstream:
        config = make_config({"moderation": {"blocked_terms": []}}, redis_url=redis_server.url,
                             models=[{"name": "up", "provider": "openai",
                                      "base_url": upstream.base_url,
                                      "upstream_model": model_name(30, 20),
                                      "stream": {"coalesce_ms": 1000}}])
        async with running_chain(config, with_edge=False) as chain:
            upstream.push(drop_after_chunks=8)
            started = time.monotonic()
            frames = await grpc_frames(chain, "up")
            took = time.monotonic() - started
    text = "".join(d.text for d in deltas(frames))
    assert text and reply_text(30).startswith(text), text
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage) == (ErrorCode.UNAVAILABLE, Stage.MID_STREAM)
    assert took < 0.8, took  # the hold alone would be 1 s
