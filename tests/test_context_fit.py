"""Fitting a chat into the context window with real tiktoken counts; telling re-sent
history from new turns."""

from __future__ import annotations

import threading

import pytest

from promptline import tokens
from promptline.errors import ErrorCode, PromptlineError
from promptline.tokens import OFF_LOOP_CHARS, count_messages, get_tokenizer
from promptline.v1 import prompt_pb2
from promptline.v1.common_pb2 import ChatMessage
from services.prompt import context_fit
from services.prompt.chat_plan import split_resent_history
from services.prompt.context_fit import MessageTokenCounts, fit_messages, message_tokens
from tests.chain import running_chain
from tests.conftest import make_config


def chat(*items: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in items]


def pairs(messages) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


SYSTEM = chat(("system", "You are a terse assistant for the Promptline docs."))
HISTORY = chat(
    ("user", "What is an error frame?"),
    ("assistant", "The last frame of a stream when something failed, with a code and a stage."),
    ("user", "And a start frame?"),
    ("assistant", "The first frame, sent once the request was admitted."),
)
NEW = chat(("user", "How do labels work?"))


def test_real_tokenizer_is_loaded():
    assert get_tokenizer().name.startswith("cl100k_base")  # the counts below are tiktoken's


def test_counts_match_count_messages():
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=10_000, reserve=100, model="m")
    assert fitted.messages == (*SYSTEM, *HISTORY, *NEW)
    assert fitted.prompt_tokens == count_messages(pairs(fitted.messages))
    assert fitted.dropped == 0


def test_trims_exactly_at_the_window_edge():
    everything = count_messages(pairs([*SYSTEM, *HISTORY, *NEW]))
    reserve = 50
    # A window exactly big enough keeps everything ...
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=everything + reserve, reserve=reserve,
                          model="m")
    assert fitted.messages == (*SYSTEM, *HISTORY, *NEW)
    assert fitted.prompt_tokens + reserve == everything + reserve
    # ... one token less drops the oldest message, and with it the orphaned reply after it.
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=everything + reserve - 1, reserve=reserve,
                          model="m")
    assert fitted.messages == (*SYSTEM, *HISTORY[2:], *NEW)
    assert fitted.dropped == 2
    assert fitted.prompt_tokens == count_messages(pairs(fitted.messages))
    assert fitted.prompt_tokens + reserve <= everything + reserve - 1


def test_newest_turns_win_and_no_message_is_cut():
    needed = count_messages(pairs([*SYSTEM, *HISTORY[2:], *NEW]))
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=needed + 10, reserve=10, model="m")
    assert fitted.messages == (*SYSTEM, *HISTORY[2:], *NEW)
    for message in fitted.messages:  # every kept message is whole
        assert message in [*SYSTEM, *HISTORY, *NEW]


def test_history_only_when_nothing_else_fits():
    needed = count_messages(pairs([*SYSTEM, *NEW]))
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=needed + 5, reserve=5, model="m")
    assert fitted.messages == (*SYSTEM, *NEW)
    assert fitted.dropped == len(HISTORY)
    assert fitted.prompt_tokens == needed


def test_history_reserve_leaves_room_for_the_default_reply():
    needed = count_messages(pairs([*SYSTEM, *NEW]))
    window = count_messages(pairs([*SYSTEM, *HISTORY, *NEW])) + 1
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=window, reserve=1,
                          history_reserve=window - needed, model="m")
    assert fitted.messages == (*SYSTEM, *NEW)


def test_newest_message_that_cannot_fit_is_context_too_long_with_counts():
    needed = count_messages(pairs([*SYSTEM, *NEW]))
    with pytest.raises(PromptlineError) as info:
        fit_messages(SYSTEM, HISTORY, NEW, window=needed + 99, reserve=100, model="small")
    err = info.value
    assert err.code is ErrorCode.CONTEXT_TOO_LONG
    system_tokens = message_tokens(*pairs(SYSTEM)[0])
    assert f"needs {needed} prompt tokens ({system_tokens} for system messages)" in err.message
    assert "max_tokens asks for 100" in err.message
    assert f"context window of {needed + 99} tokens" in err.message
    # exactly enough room: accepted
    fit_messages(SYSTEM, HISTORY, NEW, window=needed + 100, reserve=100, model="small")


@pytest.mark.parametrize(("stored", "messages", "history", "new"), [
    ((), [("user", "a")], (), [("user", "a")]),
    ((("user", "a"), ("assistant", "b")), [("user", "c")],
     (("user", "a"), ("assistant", "b")), [("user", "c")]),
    # the client re-sent the stored history: its copy is the history, only "c" is new
    ((("user", "a"), ("assistant", "b")), [("user", "a"), ("assistant", "b"), ("user", "c")],
     (("user", "a"), ("assistant", "b")), [("user", "c")]),
    # stored history trimmed to its tail; the client still holds the older turns
    ((("user", "a2"), ("assistant", "b2")),
     [("user", "a1"), ("assistant", "b1"), ("user", "a2"), ("assistant", "b2"), ("user", "c")],
     (("user", "a1"), ("assistant", "b1"), ("user", "a2"), ("assistant", "b2")),
     [("user", "c")]),
    # the same text asked again is a new turn, not a re-send
    ((("user", "a"), ("assistant", "b")), [("user", "a")],
     (("user", "a"), ("assistant", "b")), [("user", "a")]),
])
def test_split_resent_history(stored, messages, history, new):
    assert split_resent_history(tuple(chat(*stored)), chat(*messages)) == (
        tuple(chat(*history)), chat(*new))


LONG = " ".join(f"turn{i}" for i in range(400))  # ~2.4 KB, over the cache's 512 characters


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The contents `message_tokens` really counted (a cache hit counts nothing)."""
    seen: list[str] = []

    def spy(role: str, content: str) -> int:
        seen.append(content)
        return message_tokens(role, content)

    monkeypatch.setattr(context_fit, "message_tokens", spy)
    return seen


def test_a_re_sent_long_message_is_counted_once_per_tenant(counted):
    counts = MessageTokenCounts()
    a, b = counts.counter("tenant-a"), counts.counter("tenant-b")
    (user, assistant), short = chat(("user", LONG), ("assistant", LONG)), chat(("user", "short"))
    assert a(user) == a(user) == message_tokens("user", LONG)
    assert counted == [LONG]
    assert b(user) == message_tokens("user", LONG)  # another tenant counts for itself
    assert a(assistant) == message_tokens("assistant", LONG)  # the role is in the key
    assert counted == [LONG, LONG, LONG]
    assert a(*short) == a(*short)  # short ones are not kept
    assert counted[3:] == ["short", "short"] and counts.entries == 3


def test_the_counts_are_bounded_and_the_oldest_goes_first(counted):
    counts = MessageTokenCounts(max_entries=2)
    count = counts.counter("t")
    first, second, third = chat(*(("user", LONG + f" {n}") for n in range(3)))
    count(first)
    count(second)
    count(first)  # used again: now the newest
    count(third)  # evicts `second`
    assert counts.entries == 2
    counted.clear()
    count(first)
    count(third)
    assert counted == []
    count(second)
    assert counted == [second.content]


def test_fitting_with_remembered_counts_gives_the_same_plan():
    history = chat(*((m.role, f"{m.content} {LONG}") for m in HISTORY))
    fresh = fit_messages(SYSTEM, history, NEW, window=5_000, reserve=100, model="m")
    counter = MessageTokenCounts().counter("t")
    for _ in range(2):  # counting, then remembering
        assert fit_messages(SYSTEM, history, NEW, window=5_000, reserve=100, model="m",
                            count=counter) == fresh


async def test_the_prompt_service_counts_a_re_sent_transcript_once(redis_server, counted):
    transcript = chat(*((m.role, f"{m.content} {LONG}") for m in HISTORY))
    request = prompt_pb2.StreamChatRequest(model="sim", messages=[*transcript, *NEW])
    async with running_chain(make_config(redis_url=redis_server.url), with_edge=False) as chain:
        starts = []
        for _ in range(2):  # an OpenAI-style client: the whole transcript again, every turn
            call = chain.prompt_stub.StreamChat(
                request, metadata=(("authorization", "Bearer dev-key"),), timeout=10)
            starts += [f.start for f in [f async for f in call] if f.HasField("start")]
        assert starts[0].prompt_tokens == starts[1].prompt_tokens > 4 * 400
        assert chain.prompt.servicer.token_counts.entries == len(transcript)
    assert sum(LONG in content for content in counted) == len(transcript)  # not 2x


HUGE = " ".join(f"page{i}" for i in range(OFF_LOOP_CHARS // 5))  # over OFF_LOOP_CHARS


async def test_a_long_new_message_is_counted_off_the_event_loop(monkeypatch):
    threads: list[str] = []

    def spy(role: str, content: str) -> int:
        threads.append(threading.current_thread().name)
        return message_tokens(role, content)

    monkeypatch.setattr(context_fit, "message_tokens", spy)
    counts = MessageTokenCounts()
    huge, short = chat(("user", HUGE), ("user", "short"))
    count = await counts.prepared("t", [huge, short])
    assert threads and threading.main_thread().name not in threads  # counted in a worker
    threads.clear()
    assert count(huge) == message_tokens("user", HUGE)  # prepared: no count now
    assert threads == [] and counts.entries == 1
    (huge,) = chat(("user", HUGE))  # the same text in another request
    again = await counts.prepared("t", [huge])
    assert again(huge) == message_tokens("user", HUGE) and threads == []  # remembered


async def test_long_messages_are_counted_off_the_event_loop_for_usage_too(monkeypatch):
    threads: list[str] = []
    real = tokens.count_messages

    def spy(messages):
        threads.append(threading.current_thread().name)
        return real(messages)

    monkeypatch.setattr(tokens, "count_messages", spy)
    short, long = chat(("user", "hi")), chat(("user", HUGE))
    assert await tokens.count_messages_off_loop(short) == real(pairs(short))
    assert await tokens.count_messages_off_loop(long) == real(pairs(long))
    assert threads[0] == threading.main_thread().name != threads[1]
