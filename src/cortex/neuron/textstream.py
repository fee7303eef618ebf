"""From token ids to safe text deltas: incremental detokenisation and stop strings.

Detokenising token by token breaks multi-byte characters and merges (a byte-level BPE token may
hold half of a UTF-8 character); :class:`IncrementalDecoder` decodes a short window of recent
tokens and only emits text once it no longer ends in a replacement character, so a stream never
shows half a character. :class:`StopMatcher` holds back any tail that could still become a stop
string, so a stop string split across two deltas is caught and never emitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time; get the new text each one completes.

    Uses the prefix/read offset method (as in vLLM and transformers' streamers): decode
    ``ids[prefix:]`` and ``ids[prefix:read]``; the difference is the new text. The decode
    callable is the loaded model's, so this must run on the device worker thread.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix = self._read
            self._read = len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Feed text deltas; get back what is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        # The stop string that ended the text (Anthropic reports it as ``stop_sequence``).
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self._pending += text
        hits = [(self._pending.find(s), s) for s in self.stops if s in self._pending]
        if hits:
            index, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            out, self._pending = self._pending[:index], ""
            return out
        keep = self._held_tail()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def _held_tail(self) -> int:
        """Length of the longest tail of the pending text that starts some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """At the end of the generation the held tail was not a stop string after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
