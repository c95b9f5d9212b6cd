"""Fitting a chat into the context window with real tiktoken counts; telling re-sent
history from new turns."""

from __future__ import annotations

import pytest

from promptline.errors import ErrorCode, PromptlineError
from promptline.tokens import count_messages, get_tokenizer
from services.prompt.chat_plan import split_resent_history
from services.prompt.context_fit import fit_messages, message_tokens

SYSTEM = [("system", "You are a terse assistant for the Promptline docs.")]
HISTORY = [
    ("user", "What is an error frame?"),
    ("assistant", "The last frame of a stream when something failed, with a code and a stage."),
    ("user", "And a start frame?"),
    ("assistant", "The first frame, sent once the request was admitted."),
]
NEW = [("user", "How do labels work?")]


def test_real_tokenizer_is_loaded():
    assert get_tokenizer().name.startswith("cl100k_base")  # the counts below are tiktoken's


def test_counts_match_count_messages():
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=10_000, reserve=100, model="m")
    assert fitted.messages == (*SYSTEM, *HISTORY, *NEW)
    assert fitted.prompt_tokens == count_messages(fitted.messages)
    assert fitted.dropped == 0


def test_trims_exactly_at_the_window_edge():
    everything = count_messages([*SYSTEM, *HISTORY, *NEW])
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
    assert fitted.prompt_tokens == count_messages(fitted.messages)
    assert fitted.prompt_tokens + reserve <= everything + reserve - 1


def test_newest_turns_win_and_no_message_is_cut():
    needed = count_messages([*SYSTEM, *HISTORY[2:], *NEW])
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=needed + 10, reserve=10, model="m")
    assert fitted.messages == (*SYSTEM, *HISTORY[2:], *NEW)
    for role, content in fitted.messages:  # every kept message is whole
        assert (role, content) in [*SYSTEM, *HISTORY, *NEW]


def test_history_only_when_nothing_else_fits():
    needed = count_messages([*SYSTEM, *NEW])
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=needed + 5, reserve=5, model="m")
    assert fitted.messages == (*SYSTEM, *NEW)
    assert fitted.dropped == len(HISTORY)
    assert fitted.prompt_tokens == needed


def test_history_reserve_leaves_room_for_the_default_reply():
    needed = count_messages([*SYSTEM, *NEW])
    window = count_messages([*SYSTEM, *HISTORY, *NEW]) + 1
    fitted = fit_messages(SYSTEM, HISTORY, NEW, window=window, reserve=1,
                          history_reserve=window - needed, model="m")
    assert fitted.messages == (*SYSTEM, *NEW)


def test_newest_message_that_cannot_fit_is_context_too_long_with_counts():
    needed = count_messages([*SYSTEM, *NEW])
    with pytest.raises(PromptlineError) as info:
        fit_messages(SYSTEM, HISTORY, NEW, window=needed + 99, reserve=100, model="small")
    err = info.value
    assert err.code is ErrorCode.CONTEXT_TOO_LONG
    system_tokens = message_tokens(*SYSTEM[0])
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
    assert split_resent_history(stored, messages) == (history, new)
