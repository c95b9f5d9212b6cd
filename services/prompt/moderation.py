"""Input and output moderation for the prompt service.

Input (`Moderator.check_input`) runs before any provider call and raises MODERATION_BLOCKED at
stage first_packet. Output goes through a per-stream `OutputFilter`: `feed()` every delta, write
only what it returns (it may be ""), and `flush()` once at the end of the stream before the done
frame. It raises MODERATION_BLOCKED at stage mid_stream; the caller then ends the stream, which
cancels the provider.

Blocked terms match as case-folded substrings (`str.casefold`, no Unicode normalisation), so
"Forbidden-Word" and "FORBIDDEN-WORD" match "forbidden-word", and so does "xforbidden-wordy":
substrings rather than whole words because a reply can glue a term to punctuation or markup, and
a false positive is a cheaper mistake here than a leak.

Hold-back rule: the output filter keeps back the shortest tail of the text that holds every
unfinished occurrence of a term: the characters from the first one whose case-folded form
starts a proper prefix of a term that runs to the end of the text. Case folding never maps a
character to nothing (it may map one to up to three), so such a prefix starts within the last
`L - 1` characters (`L`: the longest folded term); only those are examined. No character of a
term completed later has therefore been released, and text that cannot begin a term (most of it)
goes out at once: the frames chunk shaping made reach the caller as they were cut. Each `feed()`
scans only the held tail plus the new text, never the whole reply.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Protocol

from promptline.config import ModerationConfig
from promptline.errors import ErrorCode, PromptlineError, Stage

INPUT_BLOCKED_TERM = "the request was blocked by moderation (blocked term)"
INPUT_INJECTION = "the request was blocked by moderation (prompt-injection pattern)"
OUTPUT_BLOCKED = "the reply was blocked by moderation"


def _input_blocked(message: str) -> PromptlineError:
    return PromptlineError(ErrorCode.MODERATION_BLOCKED, message, stage=Stage.FIRST_PACKET)


class OutputFilter(Protocol):
    """Per-stream, synchronous filter of the reply text; called for every delta."""

    def feed(self, text: str) -> str:
        """Return the part of the reply that is safe to deliver now (possibly "")."""
        ...

    def flush(self) -> str:
        """At the end of the stream: return whatever is still held back."""
        ...


class Moderator(Protocol):
    """What the prompt service needs from a moderator; one instance serves every stream."""

    async def check_input(self, texts: Sequence[str]) -> None:
        """Raise MODERATION_BLOCKED (stage first_packet) if any text must not be sent."""
        ...

    def output_filter(self) -> OutputFilter:
        """A fresh filter for one reply stream."""
        ...


class PassThroughFilter:
    """The filter when nothing is blocked: no hold-back, no copies."""

    __slots__ = ()

    def feed(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""


@functools.lru_cache(maxsize=16)
def _proper_prefixes(terms: tuple[str, ...]) -> frozenset[str]:
    """Every proper prefix of every term: built once per set of terms, not per stream."""
    return frozenset(term[:size] for term in terms for size in range(1, len(term)))


class BlockedTermFilter:
    """Stops a reply before any character of a blocked term is delivered (module docstring)."""

    __slots__ = ("_blocked", "_held", "_hold", "_prefixes", "_terms")

    def __init__(self, folded_terms: Sequence[str]) -> None:
        if not folded_terms:
            raise ValueError("BlockedTermFilter needs at least one term; use PassThroughFilter")
        self._terms = tuple(folded_terms)
        self._hold = max(map(len, self._terms)) - 1
        self._prefixes = _proper_prefixes(self._terms)
        self._held = ""
        self._blocked = False

    def feed(self, text: str) -> str:
        if self._blocked:
            # Sticky, so a caller that swallows the error still cannot leak the rest.
            raise self._error()
        window = self._held + text
        # The held tail was scanned by the previous call; a new match must involve `text`,
        # and scanning the tail again is what catches a term split across deltas.
        folded = window.casefold()
        for term in self._terms:
            if term in folded:
                self._blocked = True
                self._held = ""
                raise self._error()
        keep = self._unfinished_tail(window)
        if not keep:
            self._held = ""
            return window
        self._held = window[-keep:]
        return window[:-keep]

    def _unfinished_tail(self, window: str) -> int:
        """How many of the last characters of `window` could begin a term that later text
        completes: the longest k whose k-th last character starts (its folded form holds the
        start of) a proper term prefix that runs to the end."""
        tail = window[-self._hold:] if self._hold else ""
        folded = tail.casefold()
        prefixes = self._prefixes
        if len(folded) == len(tail):  # no character folds to several: k characters, k folded
            for k in range(len(tail), 0, -1):
                if folded[-k:] in prefixes:
                    return k
            return 0
        longest = 0
        folded = ""
        for k in range(1, len(tail) + 1):
            before = len(folded)
            folded = tail[-k].casefold() + folded
            if any(folded[-size:] in prefixes for size in range(before + 1, len(folded) + 1)):
                longest = k
        return longest

    def flush(self) -> str:
        if self._blocked:
            raise self._error()
        held, self._held = self._held, ""
        return held

    @staticmethod
    def _error() -> PromptlineError:
        return PromptlineError(ErrorCode.MODERATION_BLOCKED, OUTPUT_BLOCKED, stage=Stage.MID_STREAM)


class TermModerator:
    """Blocked terms (input and output) and prompt-injection regexes (input) from config.

    Injection patterns are compiled once with re.IGNORECASE, as attackers vary case freely;
    they are operator-written regexes, searched over each input text.
    """

    __slots__ = ("_patterns", "_terms")

    def __init__(self, config: ModerationConfig) -> None:
        folded = (t.casefold() for t in config.blocked_terms)
        self._terms = tuple(dict.fromkeys(t for t in folded if t))
        self._patterns = tuple(re.compile(p, re.IGNORECASE) for p in config.injection_patterns)

    async def check_input(self, texts: Sequence[str]) -> None:
        for text in texts:
            if self._terms:
                folded = text.casefold()
                if any(term in folded for term in self._terms):
                    raise _input_blocked(INPUT_BLOCKED_TERM)
            if any(p.search(text) for p in self._patterns):
                raise _input_blocked(INPUT_INJECTION)

    def output_filter(self) -> OutputFilter:
        return BlockedTermFilter(self._terms) if self._terms else PassThroughFilter()


def build_moderator(config: ModerationConfig) -> Moderator:
    """The moderator the config describes: blocked terms and injection patterns."""
    return TermModerator(config)


__all__ = [
    "BlockedTermFilter",
    "Moderator",
    "OutputFilter",
    "PassThroughFilter",
    "TermModerator",
    "build_moderator",
]
