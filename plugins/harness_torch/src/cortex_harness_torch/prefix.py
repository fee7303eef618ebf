"""Prompt prefixes kept after their generation ended, so the next request that starts the same
way skips that part of its prefill.

An agent resends its whole conversation every turn: turn ``n + 1``'s prompt is turn ``n``'s
prompt, turn ``n``'s answer, and a little more. When a generation ends, the KV of its tokens is
copied out of its row into an entry here (one copy per layer, the tokens' ids beside it); a new
generation whose prompt shares a prefix with an entry (or with a running generation's row)
copies that much KV into its own row and prefills only the rest.

Entries are bounded by a token budget and evicted least recently used first; an entry that is a
prefix of a newer one is dropped (the conversation grew past it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from cortex.harness import common_prefix

if TYPE_CHECKING:
    import torch


@attrs.define(eq=False)
class PrefixEntry:
    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    last_used: int = 0

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)


class PrefixCache:
    """Saved prefixes of one model, within ``budget_tokens`` positions."""

    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self.entries: list[PrefixEntry] = []
        self._clock = itertools.count(1)

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    def best(self, prompt: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with ``prompt``, and that length."""
        best, length = None, 0
        for entry in self.entries:
            shared = common_prefix(entry.tokens, prompt)
            if shared > length:
                best, length = entry, shared
        if best is not None:
            best.last_used = next(self._clock)
        return best, length

    def add(self, tokens: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not tokens or len(tokens) > self.budget_tokens:
            return
        key = tuple(tokens)
        for entry in self.entries:
            if len(entry.tokens) >= len(key) and entry.tokens[: len(key)] == key:
                entry.last_used = next(self._clock)  # already held (or more of it)
                return
        self.entries = [
            e
            for e in self.entries
            if not (len(e.tokens) < len(key) and key[: len(e.tokens)] == e.tokens)
        ]
        self.entries.append(PrefixEntry(key, layers, next(self._clock)))
        while self.tokens > self.budget_tokens:
            self.entries.remove(min(self.entries, key=lambda e: e.last_used))

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries)

    def clear(self) -> None:
        self.entries.clear()


def prefix_cache_tokens(context_length: int, kv_tokens: int) -> int:
    """Positions kept for saved prefixes: a quarter of the KV cache, at least one context
    (the memory estimate counts them too)."""
    return max(context_length, kv_tokens // 4)
