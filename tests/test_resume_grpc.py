"""Resumable streams at the prompt service (gRPC): the journal, ResumeChat, CancelChat and the
grace of a stream whose caller dropped. Real Redis, real gRPC servers, a fake OpenAI upstream
that records when its client closes."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.devtools.fake_openai import FakeOpenAI
from promptline.v1 import common_pb2, prompt_pb2
from services.prompt.journal import Journal
from services.prompt.runs import Runs
from tests.chain import Chain, running_chain
from tests.conftest import make_config
from tests.eventually import eventually
from tests.test_redis_modes import Mode, mode  # noqa: F401 - the fixture, for every mode

AUTH = (("authorization", "Bearer dev-key"),)
OTHER = (("authorization", "Bearer other-key"),)
REPLY = " ".join(f"word{i}" for i in range(60))


def slow_sim(grace: str = "0s", **resume: Any) -> dict[str, Any]:
    """The config: a simulated model at 100 tokens/s (60 tokens: 0.6 s), and `resume`."""
    return {"resume": {"ttl": "1m", "grace": grace, **resume}}


def request(model: str = "slow", **fields: Any) -> prompt_pb2.StreamChatRequest:
    return prompt_pb2.StreamChatRequest(
        model=model, messages=[{"role": "user", "content": "Hi"}], resumable=True,
        request_id=fields.pop("request_id", uuid.uuid4().hex), **fields)


MODELS = [{"name": "slow", "provider": "simulated",
           "simulated": {"ttft_ms": 20, "tokens_per_second": 100, "reply": REPLY},
           "stream": {"coalesce_ms": 0}}]


@contextlib.asynccontextmanager
async def chain_with(redis_url: str, grace: str = "0s", models: list[dict[str, Any]] | None = None
                     ) -> AsyncIterator[Chain]:
    config = make_config(slow_sim(grace), redis_url=redis_url, models=models or MODELS)
    async with running_chain(config, with_edge=False) as chain:
        yield chain


def upstream_models(upstream: FakeOpenAI) -> list[dict[str, Any]]:
    """Model `up` on the fake OpenAI upstream, a frame per chunk."""
    return [{"name": "up", "provider": "openai", "base_url": upstream.base_url,
             "stream": {"coalesce_ms": 0}}]


def text_of(frames: list[prompt_pb2.StreamChatResponse]) -> str:
    return "".join(f.delta.text for f in frames if f.WhichOneof("frame") == "delta")


async def collect(call: Any) -> list[prompt_pb2.StreamChatResponse]:
    frames = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for frame in call:
            frames.append(frame)
    return frames


async def drop_after(chain: Chain, req: prompt_pb2.StreamChatRequest, delta_id: int = 1
                     ) -> list[prompt_pb2.StreamChatResponse]:
    """Read the stream up to delta `delta_id`, then drop the call (a lost connection)."""
    got = []
    call = chain.prompt_stub.StreamChat(req, metadata=AUTH)
    async for frame in call:
        got.append(frame)
        if frame.WhichOneof("frame") == "delta" and frame.delta.id >= delta_id:
            break
    call.cancel()
    return got


async def test_deltas_are_numbered_and_a_finished_stream_replays_whole(redis_server: Any) -> None:
    async with chain_with(redis_server.url) as chain:
        req = request()
        frames = await collect(chain.prompt_stub.StreamChat(req, metadata=AUTH))
        deltas = [f.delta for f in frames if f.WhichOneof("frame") == "delta"]
        assert [d.id for d in deltas] == list(range(1, len(deltas) + 1))
        assert frames[-1].WhichOneof("frame") == "done"
        await asyncio.sleep(0.05)  # the journal's flush
        for after in (0, 1, len(deltas) // 2, len(deltas)):
            replay = await collect(chain.prompt_stub.ResumeChat(
                prompt_pb2.ResumeChatRequest(request_id=req.request_id, after_id=after),
                metadata=AUTH))
            assert replay[0].WhichOneof("frame") == "start"
            assert replay[0].start.request_id == req.request_id
            assert replay[-1].WhichOneof("frame") == "done"
            assert text_of(frames[:1] + [f for f in frames if f.WhichOneof("frame") == "delta"
                                         and f.delta.id <= after]) + text_of(replay) == REPLY


async def test_a_resume_follows_the_live_stream_to_its_end(redis_server: Any) -> None:
    async with chain_with(redis_server.url) as chain:
        req = request()
        call = chain.prompt_stub.StreamChat(req, metadata=AUTH)
        first: list[prompt_pb2.StreamChatResponse] = []
        async for frame in call:
            first.append(frame)
            if frame.WhichOneof("frame") == "delta" and frame.delta.id == 5:
                break
        await asyncio.sleep(0.03)
        resumed = await collect(chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=req.request_id, after_id=5), metadata=AUTH))
        assert resumed[-1].WhichOneof("frame") == "done"
        assert text_of(first) + text_of(resumed) == REPLY
        call.cancel()


async def test_without_grace_a_dropped_caller_cancels_and_the_journal_says_so(
        redis_server: Any) -> None:
    async with chain_with(redis_server.url) as chain:
        req = request()
        await drop_after(chain, req)
        await eventually(lambda: chain.engine_streams == 0, what="the engine stream ending")
        await asyncio.sleep(0.05)
        replay = await collect(chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=req.request_id), metadata=AUTH))
        assert replay[-1].WhichOneof("frame") == "error"
        assert replay[-1].error.code == common_pb2.ERROR_CODE_CANCELLED
        assert len(text_of(replay)) < len(REPLY)


async def test_with_grace_a_dropped_stream_goes_on_and_resumes_to_its_end(
        redis_server: Any) -> None:
    async with chain_with(redis_server.url, grace="5s") as chain:
        req = request()
        got = await drop_after(chain, req, 3)
        await asyncio.sleep(0.3)  # the reader is away; the stream goes on
        resumed = await collect(chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=req.request_id, after_id=3), metadata=AUTH))
        assert resumed[-1].WhichOneof("frame") == "done", resumed[-1]
        assert text_of(got) + text_of(resumed) == REPLY


async def test_grace_expiry_cancels_down_to_the_provider(redis_server: Any) -> None:
    async with FakeOpenAI(reply=REPLY, delay=0.05) as upstream:
        async with chain_with(redis_server.url, "500ms", upstream_models(upstream)) as chain:
            req = request("up")
            await drop_after(chain, req)
            dropped = time.monotonic()
            await asyncio.sleep(0.2)
            assert upstream.active_streams == 1  # within the grace: still generating
            await upstream.wait_idle(within=5)
            waited = time.monotonic() - dropped
            assert 0.45 < waited < 3.0, waited  # the grace, then one check and the close
            await eventually(lambda: chain.engine_streams == 0, what="the engine stream ending")


async def test_a_reader_keeps_a_detached_stream_alive_past_the_grace(redis_server: Any) -> None:
    async with FakeOpenAI(reply=REPLY, delay=0.04) as upstream:  # 60 chunks: 2.4 s
        async with chain_with(redis_server.url, "1s", upstream_models(upstream)) as chain:
            req = request("up")
            await drop_after(chain, req)
            resumed = await collect(chain.prompt_stub.ResumeChat(
                prompt_pb2.ResumeChatRequest(request_id=req.request_id), metadata=AUTH))
            assert resumed[-1].WhichOneof("frame") == "done"
            assert text_of(resumed) == REPLY


async def test_cancel_chat_stops_a_stream_at_once(redis_server: Any) -> None:
    async with FakeOpenAI(reply=REPLY, delay=0.05) as upstream:
        async with chain_with(redis_server.url, "30s", upstream_models(upstream)) as chain:
            req = request("up")
            call = chain.prompt_stub.StreamChat(req, metadata=AUTH)
            async for frame in call:
                if frame.WhichOneof("frame") == "delta":
                    break
            call.cancel()  # dropped, not stopped: it goes on for 30 s
            await asyncio.sleep(0.1)
            assert upstream.active_streams == 1
            answer = await chain.prompt_stub.CancelChat(
                prompt_pb2.CancelChatRequest(request_id=req.request_id), metadata=AUTH)
            assert answer.cancelled
            await upstream.wait_idle(within=2)
            await asyncio.sleep(0.05)
            again = await chain.prompt_stub.CancelChat(
                prompt_pb2.CancelChatRequest(request_id=req.request_id), metadata=AUTH)
            assert not again.cancelled  # already ended
            replay = await collect(chain.prompt_stub.ResumeChat(
                prompt_pb2.ResumeChatRequest(request_id=req.request_id), metadata=AUTH))
            assert replay[-1].error.code == common_pb2.ERROR_CODE_CANCELLED


async def test_an_attached_caller_sees_its_stop_as_a_cancelled_frame(redis_server: Any) -> None:
    async with chain_with(redis_server.url) as chain:
        req = request()
        call = chain.prompt_stub.StreamChat(req, metadata=AUTH)
        frames = []
        with pytest.raises(grpc.aio.AioRpcError):  # the error frame, then the status
            async for frame in call:
                frames.append(frame)
                if frame.WhichOneof("frame") == "delta" and frame.delta.id == 2:
                    await chain.prompt_stub.CancelChat(
                        prompt_pb2.CancelChatRequest(request_id=req.request_id), metadata=AUTH)
        assert frames[-1].error.code == common_pb2.ERROR_CODE_CANCELLED
        assert await call.code() == grpc.StatusCode.CANCELLED


async def test_another_tenant_finds_nothing(redis_server: Any) -> None:
    async with chain_with(redis_server.url) as chain:
        req = request()
        await collect(chain.prompt_stub.StreamChat(req, metadata=AUTH))
        await asyncio.sleep(0.05)
        call = chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=req.request_id), metadata=OTHER)
        frames = await collect(call)
        assert [f.WhichOneof("frame") for f in frames] == ["error"]
        assert frames[0].error.code == common_pb2.ERROR_CODE_NOT_FOUND
        assert await call.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await chain.prompt_stub.CancelChat(
                prompt_pb2.CancelChatRequest(request_id=req.request_id), metadata=OTHER)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_ids_are_invalid_requests(redis_server: Any) -> None:
    async with chain_with(redis_server.url) as chain:
        call = chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id="no spaces"), metadata=AUTH)
        frames = await collect(call)
        assert frames[0].error.code == common_pb2.ERROR_CODE_INVALID_REQUEST
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_reused_request_id_resumes_the_newest_stream(redis_server: Any) -> None:
    """A client that retries with the same X-Request-Id resumes the stream it retried into;
    the two streams' frames never mix."""
    async with chain_with(redis_server.url) as chain:
        req = request()
        first = await collect(chain.prompt_stub.StreamChat(req, metadata=AUTH))
        assert text_of(first) == REPLY
        second = await collect(chain.prompt_stub.StreamChat(request(request_id=req.request_id,
                                                                    model="sim"), metadata=AUTH))
        assert second[-1].WhichOneof("frame") == "done" and text_of(second) != REPLY
        await asyncio.sleep(0.05)
        replay = await collect(chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=req.request_id), metadata=AUTH))
        assert text_of(replay) == text_of(second)
        assert [f.WhichOneof("frame") for f in replay].count("start") == 1


async def test_an_old_stop_mark_does_not_stop_a_new_stream_with_its_id(
        redis_server: Any) -> None:
    """A Stop another replica marked for an earlier stream with this id (10 s mark) is not the
    new stream's: the new one's first write clears it, and it runs to done."""
    import redis.asyncio as aioredis

    from services.prompt.journal import journal_key

    async with chain_with(redis_server.url) as chain:
        req = request()
        client = aioredis.from_url(redis_server.url)
        try:
            await client.set(journal_key("dev", req.request_id) + ":stop", "1", px=10_000)
            frames = await collect(chain.prompt_stub.StreamChat(req, metadata=AUTH))
        finally:
            await client.aclose()
    assert frames[-1].WhichOneof("frame") == "done" and text_of(frames) == REPLY


async def test_without_redis_streams_work_and_resume_is_unavailable() -> None:
    config = make_config(slow_sim("5s"), redis_url="redis://127.0.0.1:1/0", models=MODELS)
    config = type(config)(**{**{f: getattr(config, f) for f in config.__dataclass_fields__},
                             "quota_policy": type(config.quota_policy)(on_redis_error="fail_open")})
    async with running_chain(config, with_edge=False) as chain:
        req = request()
        frames = await collect(chain.prompt_stub.StreamChat(req, metadata=AUTH))
        assert frames[-1].WhichOneof("frame") == "done" and text_of(frames) == REPLY
        call = chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=req.request_id), metadata=AUTH)
        got = await collect(call)
        assert got[0].error.code == common_pb2.ERROR_CODE_UNAVAILABLE
        assert "unreachable" in got[0].error.message
        assert await call.code() == grpc.StatusCode.UNAVAILABLE


async def test_resume_and_cancel_in_every_redis_mode(mode: Mode) -> None:  # noqa: F811
    config = make_config({**mode.overrides, **slow_sim("5s")}, models=MODELS)
    async with running_chain(config, with_edge=False) as chain:
        req = request()
        got = await drop_after(chain, req, 3)
        resumed = await collect(chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=req.request_id, after_id=3), metadata=AUTH))
        assert text_of(got) + text_of(resumed) == REPLY
        stopped = request()
        await drop_after(chain, stopped)
        # The stop mark path (a replica that does not run the stream) in this mode's Redis.
        assert await chain.prompt.servicer.journal.mark_stop("dev", stopped.request_id)
        replay = await collect(chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=stopped.request_id), metadata=AUTH))
        assert replay[-1].error.code == common_pb2.ERROR_CODE_CANCELLED
        assert len(text_of(replay)) < len(REPLY)


async def test_many_journaled_streams_at_once_all_finish(redis_server: Any) -> None:
    """One flusher serves every stream of a replica in one pipeline: each stream's replies are
    its own (a reply misread as another's stop mark once stopped streams at random)."""
    async with chain_with(redis_server.url, grace="5s") as chain:
        reqs = [request() for _ in range(12)]
        ends = await asyncio.gather(*(collect(chain.prompt_stub.StreamChat(r, metadata=AUTH))
                                      for r in reqs))
        assert [e[-1].WhichOneof("frame") for e in ends] == ["done"] * len(reqs)
        assert all(text_of(e) == REPLY for e in ends)
        await asyncio.sleep(0.05)
        replays = await asyncio.gather(*(collect(chain.prompt_stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=r.request_id), metadata=AUTH)) for r in reqs))
        assert all(text_of(r) == REPLY for r in replays)


async def test_a_journal_is_kept_its_ttl_from_the_stream_end(redis_client: Any) -> None:
    """The terminal frame flushed before the stream closed (the session's own Redis work comes
    between): closing renews the expiry anyway, so the journal is not gone up to ttl/2 early."""
    journal = Journal(redis_client, 1.0)
    writer = journal.open("ttl-tenant", f"ttl-{uuid.uuid4().hex}", 2.0, lambda: None)
    frame = prompt_pb2.StreamChatResponse(
        delta=common_pb2.Delta(text="hi", id=1))
    writer.append(frame)
    await eventually(lambda: redis_client.exists(writer.key), what="the first write")
    await asyncio.sleep(0.5)
    writer.append(prompt_pb2.StreamChatResponse(done=common_pb2.Done(finish_reason="stop")))
    await eventually(lambda: not writer.buffer, what="the terminal frame written")
    await asyncio.sleep(0.4)  # still before the half-ttl renewal the next write would bring
    journal.close(writer)
    await eventually(lambda: writer.dead, what="the writer closed")
    assert await redis_client.pttl(writer.key) > 1600  # ~1,100 without the renewal
    await journal.drain(1.0)


class _RunStandIn:
    """What `Runs` reads of a run: its id, tenant and task, and how it is cancelled."""

    def __init__(self, tenant: str, request_id: str) -> None:
        self.tenant, self.request_id = tenant, request_id
        self.task = asyncio.ensure_future(asyncio.sleep(60))
        self.reason = ""

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.task.cancel()

    async def wait(self) -> None:
        await asyncio.gather(self.task, return_exceptions=True)


async def test_runs_under_one_request_id_are_each_kept() -> None:
    """Callers choose request ids: another tenant's stream, or a retry, under the same id must
    not hide a running stream from its tenant's Stop or from the shutdown that cancels it."""
    runs = Runs()
    first, other, retry = (_RunStandIn("a", "x"), _RunStandIn("b", "x"), _RunStandIn("a", "x"))
    for run in (first, other, retry):
        runs.add(run)  # type: ignore[arg-type]
    assert runs.find("a", "x") is retry and runs.find("b", "x") is other
    await runs.stop(1.0)
    assert all(run.reason and run.task.cancelled() for run in (first, other, retry))
    await asyncio.sleep(0)  # the done callbacks
    assert runs.find("a", "x") is None


async def test_a_journal_with_a_hole_is_not_replayed_as_whole() -> None:
    """Redis stalls mid-stream: the journal drops what it could not write while the stream goes
    on to `done`. A resume then answers UNAVAILABLE instead of the reply with text missing (or,
    had the dropped batch held `start`, no text at all), ended by `done` as if whole."""
    model = {**MODELS[0], "name": "slower",
             "simulated": {"ttft_ms": 20, "tokens_per_second": 20, "reply": REPLY}}
    with EmbeddedRedis() as server:  # our own: this test stalls it
        async with chain_with(server.url, models=[model]) as chain:
            req = request("slower")
            live = asyncio.create_task(collect(chain.prompt_stub.StreamChat(req, metadata=AUTH)))
            await asyncio.sleep(0.6)
            server.pause()
            try:
                await asyncio.sleep(1.2)  # past the journal's 1 s bound: a batch dropped
            finally:
                server.resume()
            frames = await live
            assert frames[-1].WhichOneof("frame") == "done" and text_of(frames) == REPLY
            await asyncio.sleep(0.05)  # the journal's last flush
            replay = await collect(chain.prompt_stub.ResumeChat(
                prompt_pb2.ResumeChatRequest(request_id=req.request_id), metadata=AUTH))
            assert replay[-1].WhichOneof("frame") == "error", [f.WhichOneof("frame")
                                                               for f in replay]
            assert replay[-1].error.code == common_pb2.ERROR_CODE_UNAVAILABLE
            assert "not journaled" in replay[-1].error.message
            assert REPLY.startswith(text_of(replay))  # what came before the hole, no more
