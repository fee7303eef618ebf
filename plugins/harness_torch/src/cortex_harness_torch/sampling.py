"""Turning one step's logits into a token: penalties, temperature, top-k, top-p, seeded draws.

Kept apart from the model loop so the rules are in one readable place. Conventions follow what
clients expect from OpenAI and vLLM: ``repetition_penalty`` (the CTRL/transformers rule) applies
to prompt and generated tokens; ``frequency_penalty`` and ``presence_penalty`` (OpenAI) apply to
generated tokens only; ``temperature == 0`` is greedy and ignores the other knobs, so greedy output
is exactly ``argmax`` (what ``generate(do_sample=False)`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cortex.harness import SamplingParams, Step

if TYPE_CHECKING:
    import torch


class TokenSampler:
    """Per-generation sampling state: the seeded generator and the token counts penalties need.

    Lives on the device worker thread with its generation; every tensor stays on the model's
    device.
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device
    ) -> None:
        import torch

        self.params = params
        self.greedy = params.temperature == 0
        self._generator: torch.Generator | None = None
        if not self.greedy:
            self._generator = torch.Generator(device=device)
            if params.seed is not None:
                # any integer: torch takes 64 bits (a negative one maps the same either way)
                self._generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
            else:
                self._generator.seed()
        self._uses_repetition = params.repetition_penalty != 1.0
        self._uses_counts = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        # no penalty changes the logits: greedy is a plain argmax (rows of a batch share one)
        self.penalised = self._uses_repetition or self._uses_counts
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        if self._uses_repetition:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self._seen[torch.tensor(ids, device=device)] = True
        if self._uses_counts:
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def observe(self, token_id: int) -> None:
        """Record a generated token for the penalties of later steps."""
        if self._seen is not None and token_id < self._seen.shape[0]:
            self._seen[token_id] = True
        if self._counts is not None and token_id < self._counts.shape[0]:
            self._counts[token_id] += 1

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        if self._seen is not None:
            penalty = self.params.repetition_penalty
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self._seen, penalised, logits)
        if self._counts is not None:
            logits = logits - self.params.frequency_penalty * self._counts
            logits = logits - self.params.presence_penalty * (self._counts > 0).float()
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from one position's logits (a 1-D tensor over the vocabulary)."""
        import torch

        logits = logits.float()
        vocab = logits.shape[-1]
        if self._seen is not None and self._seen.shape[0] != vocab:
            self._seen = self._resize(self._seen, vocab)
        if self._counts is not None and self._counts.shape[0] != vocab:
            self._counts = self._resize(self._counts, vocab)
        logits = self._penalise(logits)
        if self.greedy:
            return int(torch.argmax(logits).item())
        logits = logits / self.params.temperature
        top_k = self.params.top_k
        if 0 < top_k < vocab:
            threshold = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = cumulative - sorted_probs >= self.params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator).item())

    @staticmethod
    def _resize(tensor: torch.Tensor, size: int) -> torch.Tensor:
        import torch

        out = torch.zeros(size, dtype=tensor.dtype, device=tensor.device)
        keep = min(size, tensor.shape[0])
        out[:keep] = tensor[:keep]
        return out


def step_of(
    token: int, logits: torch.Tensor, logprobs: int | None, eos_ids: frozenset[int]
) -> Step:
    """The :class:`Step` for ``token``, with its log-probability and the ``logprobs`` most
    likely tokens' when asked: ``log_softmax`` of the step's raw logits (before temperature,
    top-k/p and penalties), in float32."""
    if logprobs is None:
        return Step(token, is_eos=token in eos_ids)
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if logprobs > 0:
        values, ids = torch.topk(log_probs, min(logprobs, log_probs.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return Step(token, is_eos=token in eos_ids, logprob=float(log_probs[token]), top_logprobs=top)
