"""Chunk shaping: fewer, larger text frames after the first one, on purpose.

The engine shapes once, as close to the provider as possible, so every hop behind it carries the
shaped frames. The rules (`models[].stream`, overridable per request):

- the first text goes out at once, never held;
- after it, text is held at most `coalesce_ms` (0: shaping off, every chunk goes out as it
  comes, as the pump delivers it);
- it goes out earlier once `min_chars` characters are held (0: never early), cut after the last
  `boundary` in what is held (`none`: anywhere, `word`: after whitespace, `line`: after a
  newline) when that leaves at least `min_chars`; otherwise it waits, `coalesce_ms` at most;
- the end of the stream flushes what is held, before the terminal frame; so does an error: text
  the provider produced before it failed is delivered, then the error frame;
- held text never exceeds MAX_HELD_CHARS.

The hold happens at the source where it can (`ReadPacer`): once the first text went out, the
provider's socket is read once per `coalesce_ms`, and each read is a frame; text waits in the
socket buffer, so the engine wakes once per frame instead of once per token. The shaper then holds
only for `min_chars` and boundaries.

Token counts travel with the text: a frame carries the tokens of every chunk it completes, so
the counts of all frames add up to the provider's.
"""

from __future__ import annotations

from dataclasses import dataclass

from promptline.v1 import common_pb2

_CUT = {"word": (" ", "\n", "\t", "\r"), "line": ("\n",)}
MAX_HELD_CHARS = 16 * 1024
"""Held text goes out at this size whatever the rules say: a flooding provider must not pile up
megabytes in one frame (the pump's own bound applies only to what the writer has not taken)."""


@dataclass(frozen=True, slots=True)
class Shape:
    """How one stream's text is shaped (the model's `stream` with the request's overrides)."""

    coalesce_ms: int = 0
    min_chars: int = 0
    boundary: str = "none"

    @property
    def active(self) -> bool:
        return self.coalesce_ms > 0

    def with_overrides(self, request: common_pb2.StreamShape | None) -> Shape:
        """This shape with what the request sets (each field only when present)."""
        if request is None:
            return self
        return Shape(
            request.coalesce_ms if request.HasField("coalesce_ms") else self.coalesce_ms,
            request.min_chars if request.HasField("min_chars") else self.min_chars,
            request.boundary or self.boundary)


class Shaper:
    """Holds the text of one stream between frames; all times are the event loop's clock."""

    __slots__ = ("_chars", "_deadline", "_held", "_hold_s", "_min_chars", "_paced", "_sent_first",
                 "_stops")

    def __init__(self, shape: Shape, *, paced: bool = False) -> None:
        self._paced = paced
        """The provider is read at the hold's pace (`ReadPacer`): text waited in its socket."""
        self._hold_s = shape.coalesce_ms / 1000
        self._min_chars = shape.min_chars
        self._stops = _CUT.get(shape.boundary, ())
        self._held: list[tuple[str, int]] = []
        self._chars = 0
        self._deadline: float | None = None
        self._sent_first = False

    def feed(self, text: str, tokens: int, now: float) -> tuple[str, int] | None:
        """Text and tokens that arrived; returns the frame to send now, if any."""
        if not self._sent_first:
            self._sent_first = True
            return text, tokens
        self._held.append((text, tokens))
        self._chars += len(text)
        if self._deadline is None:
            self._deadline = now + self._hold_s
        if (now >= self._deadline or self._chars >= MAX_HELD_CHARS
                or (self._paced and not self._min_chars)):  # it already waited at the source
            return self.flush()
        if self._min_chars and self._chars >= self._min_chars:
            return self._cut()
        return None

    def wait(self, now: float) -> float | None:
        """Seconds until held text is due; None when nothing is held."""
        return None if self._deadline is None else max(0.0, self._deadline - now)

    def due(self, now: float) -> tuple[str, int] | None:
        """The held text once its time is up."""
        if self._deadline is not None and now >= self._deadline:
            return self.flush()
        return None

    def flush(self) -> tuple[str, int] | None:
        """Everything held (the end of the stream, or its time is up)."""
        if not self._held:
            return None
        text = "".join(piece for piece, _ in self._held)
        tokens = sum(count for _, count in self._held)
        self._held, self._chars, self._deadline = [], 0, None
        return text, tokens

    def _cut(self) -> tuple[str, int] | None:
        """What is held up to the last boundary, if that is min_chars or more; the rest stays
        (its wait goes on)."""
        if not self._stops:
            return self.flush()
        text = "".join(piece for piece, _ in self._held)
        cut = max(text.rfind(stop) for stop in self._stops) + 1
        if cut < self._min_chars:  # an early frame is at least min_chars long
            return None
        if cut == len(text):
            return self.flush()
        sent_tokens, rest, position = 0, [], 0
        for piece, count in self._held:
            end = position + len(piece)
            if end <= cut:
                sent_tokens += count
            elif position < cut:  # the piece the cut splits: its tokens go with its end
                rest.append((piece[cut - position:], count))
            else:
                rest.append((piece, count))
            position = end
        self._held = rest
        self._chars = len(text) - cut
        return text[:cut], sent_tokens
