"""A transformers model whose running generations advance together: the batched contract
(:class:`cortex.harness.BatchedModel`) on top of :class:`~cortex_harness_torch.model.TorchModel`.

Each scheduler iteration calls :meth:`BatchedTorchModel.step_batch` once with every running
generation of the model. It runs at most two forward passes:

* **prompt chunks**: the generations still prefilling, each with the chunk the scheduler gave
  it, in one pass (chunks of different lengths are padded at the front; a padding token is
  written past the end of its row's tokens, where nothing reads it before a real token
  overwrites it);
* **decode**: one token for every running row, in one pass over the contiguous running rows of
  the :class:`~cortex_harness_torch.rows.RowCache` (a row that is not decoding this iteration,
  being mid-prompt, gets a dummy token at its next position, which its next chunk overwrites).

Positions, RoPE and the attention mask are per row, so rows of different lengths (and rows
that joined at different times) give exactly the tokens they give alone: the parity tests
check it token for token against ``generate()``. Sampling is per row (each generation keeps its
own :class:`~cortex_harness_torch.sampling.TokenSampler`, seeded generator and penalty counts);
rows that are greedy without penalties share one ``argmax``.

A new generation reuses the longest prefix of its prompt that a running row or a saved prefix
(:class:`~cortex_harness_torch.prefix.PrefixCache`) holds, copying that KV into its row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs

from cortex.harness import BatchRow, HarnessError, SamplingParams, Step, common_prefix
from cortex_harness_torch.model import TorchModel, guarded, release_device_cache
from cortex_harness_torch.prefix import PrefixCache, prefix_cache_tokens
from cortex_harness_torch.rows import RowCache, attention_mask
from cortex_harness_torch.sampling import TokenSampler, step_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@attrs.define
class PrefillStats:
    """Counters that make prefix reuse and batching measurable (tests and benchmarks read
    them)."""

    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0
    tokens_evaluated: int = 0
    forward_passes: int = 0


class BatchedTorchGeneration:
    """One generation of a :class:`BatchedTorchModel` (``cortex.harness.BatchedGeneration``)."""

    def __init__(
        self, owner: BatchedTorchModel, prompt_ids: list[int], sampling: SamplingParams
    ) -> None:
        self._owner = owner
        self.tokens = list(prompt_ids)
        self.cached = 0  # tokens[:cached] are in the KV cache
        self.row: int | None = None
        self.sampler = TokenSampler(sampling, self.tokens, owner.vocab_size, owner.torch_device)
        self.constraint = owner.constraint_for(sampling)
        # rows that are greedy with nothing changing their logits share one argmax
        self.plain_greedy = (
            self.sampler.greedy and not self.sampler.penalised and self.constraint is None
        )
        self.closed = False

    @property
    def pending_tokens(self) -> int:
        return len(self.tokens) - self.cached

    def step(self) -> Step:
        """One token, this generation alone (the scheduler uses ``step_batch`` instead)."""
        if self.closed:
            raise HarnessError("step() on a closed generation")
        if self.row is None:
            self._owner.admit(self)
        while True:
            step = self._owner.step_batch([(self, self.pending_tokens)])[0]
            if step is not None:
                return step

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._owner.release(self)


class BatchedTorchModel(TorchModel):
    """A loaded transformers model with continuous batching. Every method runs on the device's
    worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        torch_device: torch.device,
        context_length: int,
        max_batch: int,
        kv_tokens: int,
        prefix_cache_tokens: int,
    ) -> None:
        super().__init__(model, tokenizer, torch_device, context_length)
        self.max_batch = max_batch
        self.kv_tokens = kv_tokens
        self._rows = RowCache(torch_device, max_batch)
        self._running: list[BatchedTorchGeneration] = []
        self.prefixes = PrefixCache(prefix_cache_tokens)
        self.stats = PrefillStats()
        self._dtype = next(model.parameters()).dtype
        config = model.config
        from cortex_harness_torch.memory import kv_cache_bytes

        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        element = torch_element_size(self._dtype)
        self._kv_bytes_per_token = kv_cache_bytes(text_config.to_dict(), 1, element)
        layer_types = set(getattr(config, "layer_types", None) or ())
        window = getattr(config, "sliding_window", None)
        # models with sliding-window layers take one mask per layer type; older configs with
        # a window on every layer take one windowed mask
        self._masks_by_layer_type = "sliding_attention" in layer_types
        self._window = (
            int(window) if window and (self._masks_by_layer_type or not layer_types) else None
        )

    # ---- generations ----------------------------------------------------------------------

    def start(self, prompt_ids: list[int], sampling: SamplingParams) -> BatchedTorchGeneration:
        self.check_prompt(prompt_ids)
        return BatchedTorchGeneration(self, prompt_ids, sampling)

    def admit(self, generation: BatchedTorchGeneration) -> None:
        """Give ``generation`` the next row and copy in the longest cached prefix of its prompt
        (from a running row or a saved prefix); at least its last prompt token is left to
        evaluate, for the logits of its first token."""
        import torch

        if generation.row is not None:
            return
        with torch.inference_mode():  # the KV tensors are inference tensors
            self._admit(generation)

    def _admit(self, generation: BatchedTorchGeneration) -> None:
        if len(self._running) >= self.max_batch:
            raise HarnessError(f"{self.max_batch} generations already run (max_batch)")
        row = len(self._running)
        prompt = generation.tokens
        entry, from_entry = self.prefixes.best(prompt)
        source_row, from_row = None, 0
        for other in self._running:
            shared = common_prefix(other.tokens[: other.cached], prompt)
            if shared > from_row:
                source_row, from_row = other.row, shared
        reuse = min(max(from_entry, from_row), len(prompt) - 1)
        self._rows.ensure(row + 1, max(self._rows.positions, reuse + 1))
        if reuse > 0:
            if from_row >= from_entry and source_row is not None:
                self._rows.copy_row(source_row, row, reuse)
            elif entry is not None:
                self._rows.allocate_like(entry.layers)
                self._rows.write_row(row, entry.layers, reuse)
        generation.row = row
        generation.cached = max(reuse, 0)
        self._running.append(generation)
        self.stats.prompt_tokens += len(prompt)
        self.stats.prompt_tokens_reused += generation.cached

    def release(self, generation: BatchedTorchGeneration) -> None:
        """A generation ended: keep its KV as a prefix for later requests, and give its row to
        the last running one (rows stay contiguous)."""
        import torch

        row = generation.row
        if row is None:
            return
        generation.row = None
        last = self._running.pop()
        if last is not generation:
            self._running[row] = last
        with torch.inference_mode():  # the KV tensors are inference tensors
            if generation.cached > 0 and self._rows.allocated:
                tokens = generation.tokens[: generation.cached]
                self.prefixes.add(tokens, self._rows.read_row(row, generation.cached))
            if last is not generation:
                assert last.row is not None
                self._rows.copy_row(last.row, row, last.cached)
                last.row = row
        if not self._running:
            self._rows.free()  # idle: give the memory back (saved prefixes stay)

    # ---- the batched step ----------------------------------------------------------------

    def step_batch(self, rows: Sequence[BatchRow]) -> list[Step | None]:
        return guarded(lambda: self._step_batch(rows))

    def _step_batch(self, rows: Sequence[BatchRow]) -> list[Step | None]:
        import torch

        results: list[Step | None] = [None] * len(rows)
        decode: list[tuple[int, BatchedTorchGeneration]] = []
        prefill: list[tuple[int, BatchedTorchGeneration, int]] = []
        for i, (row, count) in enumerate(rows):
            generation = cast(BatchedTorchGeneration, row)  # rows hold this model's generations
            if generation.row is None or generation.closed:
                raise HarnessError("step_batch() with a generation that is not running")
            if not 1 <= count <= generation.pending_tokens:
                raise HarnessError(
                    f"step_batch() asked for {count} tokens of a generation with "
                    f"{generation.pending_tokens} pending"
                )
            if count == 1:
                decode.append((i, generation))
            else:
                prefill.append((i, generation, count))
        longest_chunk = max((count for _, _, count in prefill), default=1)
        needed = max(g.cached for g in self._running) + longest_chunk + 1
        self._rows.ensure(len(self._running), needed)
        with torch.inference_mode():
            if prefill:
                self._prefill(prefill, longest_chunk, results)
            if decode:
                self._decode(decode, results)
        return results

    def _prefill(
        self,
        chunks: list[tuple[int, BatchedTorchGeneration, int]],
        width: int,
        results: list[Step | None],
    ) -> None:
        import torch

        ids: list[list[int]] = []
        positions: list[list[int]] = []
        for _, generation, count in chunks:
            start = generation.cached
            pad = width - count
            ids.append([0] * pad + generation.tokens[start : start + count])
            # padding goes after the row's tokens (nothing reads it; real tokens overwrite it)
            positions.append(
                list(range(start + count, start + count + pad)) + list(range(start, start + count))
            )
        device = self.torch_device
        position_tensor = torch.tensor(positions, dtype=torch.long, device=device)
        if len(chunks) == 1:
            row = chunks[0][1].row
            assert row is not None
            rows: Any = slice(row, row + 1)
        else:
            rows = torch.tensor([g.row for _, g, _ in chunks], dtype=torch.long, device=device)
        view = max(g.cached + width for _, g, _ in chunks)
        logits = self._forward(ids, position_tensor, rows, view)
        finished: list[tuple[int, BatchedTorchGeneration, int]] = []
        for batch_row, (i, generation, count) in enumerate(chunks):
            generation.cached += count
            self.stats.tokens_evaluated += count
            if generation.pending_tokens == 0:
                finished.append((i, generation, batch_row))
        if finished:
            self._sample(logits, finished, results)

    def _decode(
        self, decoding: list[tuple[int, BatchedTorchGeneration]], results: list[Step | None]
    ) -> None:
        import torch

        running = self._running
        ids = [[0] for _ in running]
        for _, generation in decoding:
            ids[generation.row][0] = generation.tokens[-1]  # type: ignore[index]
        # a row that is not decoding gets a dummy token at its next position: its own next
        # evaluation overwrites it, and its logits are not read
        position_list = [[g.cached] for g in running]
        positions = torch.tensor(position_list, dtype=torch.long, device=self.torch_device)
        view = max(p[0] for p in position_list) + 1
        logits = self._forward(ids, positions, slice(0, len(running)), view)
        for _, generation in decoding:
            generation.cached += 1
        self.stats.tokens_evaluated += len(decoding)
        self._sample(logits, [(i, g, g.row) for i, g in decoding], results)  # type: ignore[misc]

    def _forward(self, ids: list[list[int]], positions: Any, rows: Any, view: int) -> Any:
        import torch

        self._rows.plan(rows, positions, view)
        mask: Any = attention_mask(positions, view, self._dtype, self._window)
        if self._masks_by_layer_type:
            mask = {
                "full_attention": attention_mask(positions, view, self._dtype),
                "sliding_attention": mask,
            }
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.torch_device)
        output = self.model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_argument: self._rows},
        )
        self.stats.forward_passes += 1
        return output.logits[:, -1]

    def _sample(
        self,
        logits: Any,
        rows: list[tuple[int, BatchedTorchGeneration, int]],
        results: list[Step | None],
    ) -> None:
        """Pick each row's next token: one argmax for the plain greedy rows, each other row
        with its own sampler."""
        import torch

        greedy = [(i, g, r) for i, g, r in rows if g.plain_greedy]
        if greedy:
            index = torch.tensor([r for _, _, r in greedy], device=logits.device)
            tokens = logits.index_select(0, index).argmax(dim=-1).tolist()
            for (i, generation, r), token in zip(greedy, tokens, strict=True):
                results[i] = self._append(generation, int(token), logits[r])
        for i, generation, r in rows:
            if not generation.plain_greedy:
                row = logits[r]
                constraint = generation.constraint
                token = generation.sampler.choose(
                    row if constraint is None else constraint.mask(row)
                )
                generation.sampler.observe(token)
                if constraint is not None:
                    constraint.accept(token)
                results[i] = self._append(generation, token, row)

    def _append(self, generation: BatchedTorchGeneration, token: int, logits: Any) -> Step:
        generation.tokens.append(token)
        return step_of(token, logits, generation.sampler.params.logprobs, self.eos_ids)

    # ---- memory -------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop the saved prefixes (running generations keep their rows)."""
        self.prefixes.clear()
        if not self._running:
            self._rows.free()
        release_device_cache(self.torch_device)

    def memory_bytes(self) -> int:
        """Weights plus the KV cache at capacity (``kv_tokens`` for running generations and
        the saved prefixes' budget): the KV tensors grow with the batch up to that, so the
        node's ledger counts it all from the start. More only when the rows' padding to the
        longest sequence makes them larger (docs/harnesses.md)."""
        if self.model is None:
            return 0
        capacity = (self.kv_tokens + self.prefixes.budget_tokens) * self._kv_bytes_per_token
        used = self._rows.nbytes() + self.prefixes.nbytes()
        return super().memory_bytes() + max(capacity, used)

    def unload(self) -> None:
        self._running.clear()
        self._rows.free()
        self.prefixes.clear()
        super().unload()

    # ---- the load-time check ----------------------------------------------------------------

    def self_check(self) -> str | None:
        """Run a short prompt through the batched path (two chunks) and through a plain forward
        pass; None when the last logits agree, else why not (the harness then serves this
        model one sequence at a time). Catches architectures whose attention does not go
        through the cache and mask the way this class drives them."""
        import torch

        prompt = [i % self.vocab_size for i in range(3, 11)]
        try:
            with torch.inference_mode():
                reference = self.model(input_ids=torch.tensor([prompt], device=self.torch_device))
                expected = reference.logits[0, -1].float()
                generation = self.start(prompt, SamplingParams(temperature=0.0))
                self.admit(generation)
                self._rows.ensure(1, len(prompt) + 1)
                first = self._check_chunk(generation, prompt[:5], 0)
                del first
                got = self._check_chunk(generation, prompt[5:], 5).float()
                generation.closed = True
                self.release(generation)
                self.prefixes.clear()
        except Exception as exc:
            self._running.clear()
            self._rows.free()
            self.prefixes.clear()
            return f"{type(exc).__name__}: {exc}"
        tolerance = 1e-3 if self._dtype == torch.float32 else 5e-2
        difference = float((got - expected).abs().max())
        scale = float(expected.abs().max()) or 1.0
        if difference > tolerance * max(1.0, scale):
            return f"batched logits differ from a plain forward pass by {difference:.3g}"
        return None

    def _check_chunk(self, generation: BatchedTorchGeneration, chunk: list[int], start: int) -> Any:
        import torch

        row = generation.row
        assert row is not None
        positions = torch.arange(start, start + len(chunk), device=self.torch_device)[None]
        logits = self._forward([chunk], positions, slice(row, row + 1), start + len(chunk))
        generation.cached = start + len(chunk)
        return logits[0]


def serve_model(
    model: Any, tokenizer: Any, torch_device: torch.device, context_length: int, options: Any
) -> TorchModel:
    """The loaded model as the harness serves it: batched, with the capacity the load asked for
    (``max_batch``, ``kv_tokens``: :func:`cortex.harness.capacity_of`), unless the load-time
    check finds the architecture does not batch correctly; then one sequence at a time."""
    from cortex.harness import capacity_of

    max_batch, kv_tokens = capacity_of(context_length, options)
    batched = BatchedTorchModel(
        model,
        tokenizer,
        torch_device,
        context_length,
        max_batch=max_batch,
        kv_tokens=kv_tokens,
        prefix_cache_tokens=prefix_cache_tokens(context_length, kv_tokens),
    )
    signature = architecture_signature(model, torch_device)
    if signature not in _CHECKED:
        _CHECKED[signature] = batched.self_check()
    problem = _CHECKED[signature]
    if problem is None:
        batched.stats = PrefillStats()
        return batched
    log.warning(
        "%s: batched generation failed its check (%s); serving one sequence at a time",
        type(model).__name__,
        problem,
    )
    return TorchModel(model, tokenizer, torch_device, context_length)


# The load-time check's verdict per architecture (it tests code paths, not weights), so a
# process checks each architecture once: on a 1 GB model the check took 1.5-3 s on CPU, most of
# it the first touch of the weights' pages (which the first request would otherwise pay).
_CHECKED: dict[tuple[Any, ...], str | None] = {}


def architecture_signature(model: Any, torch_device: Any) -> tuple[Any, ...]:
    """What decides whether the batched path drives a model correctly: its class, attention
    implementation, layer types and sliding window, dtype and device kind."""
    config = model.config
    return (
        type(model).__qualname__,
        getattr(config, "_attn_implementation", None),
        tuple(getattr(config, "layer_types", None) or ()),
        bool(getattr(config, "sliding_window", None)),
        str(next(model.parameters()).dtype),
        getattr(torch_device, "type", str(torch_device)),
    )


def torch_element_size(dtype: Any) -> int:
    import torch

    return int(torch.empty((), dtype=dtype).element_size())
