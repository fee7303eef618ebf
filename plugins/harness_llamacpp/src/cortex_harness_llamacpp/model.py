"""A GGUF model resident on one device, and its generations, batched.

One llama.cpp context holds a *unified* KV cache of ``kv_cells`` cells (the model's ``kv_tokens``
capacity) shared by its sequences. Each sequence id is a *slot*. A running generation owns a
slot; a slot whose generation ended keeps its tokens (a prefix cache) until its cells are needed.

* **Batched steps.** The neuron's scheduler calls :meth:`LlamaCppModel.step_batch` once per
  iteration with every running generation: one ``llama_batch`` holds each generation's pending
  tokens (a chunk of its prompt, or its one sampled token), each at its own position of its own
  sequence, logits only where a row's next token is sampled (llama.cpp server's slots do the
  same). A batch larger than ``n_batch`` is decoded in parts.
* **Admission** (:meth:`LlamaCppModel.admit`): a new generation takes the free slot whose cached
  tokens share the longest prefix with its prompt and keeps that prefix (a chat that grows by one
  turn re-evaluates one turn, not the whole conversation); or, when a running generation shares
  more, a copy of that sequence's cells (``llama_memory_seq_cp``: the cells are shared, not
  duplicated), so parallel requests with one long system prompt evaluate it once.
* **Never thrash.** The scheduler admits a generation only while the KV reservations of the
  running ones (prompt + ``max_tokens``) fit the cache, so a running sequence is never evicted:
  when a decode finds no free cells, only the cells of idle slots (the prefix cache) are
  dropped, least recently used first.

Every method runs on the device's worker thread (the neuron guarantees it), so nothing here locks.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from cortex.devices import Device
from cortex.harness import (
    LOGPROBS,
    STRUCTURED_OUTPUT,
    BatchRow,
    HarnessError,
    PromptError,
    SamplingParams,
    Step,
    common_prefix,
    template_capabilities,
)
from cortex.tool_grammar import tool_call_style
from cortex_harness_llamacpp import native
from cortex_harness_llamacpp.sampling import build_sampler
from cortex_harness_llamacpp.settings import LlamaCppSettings

log = logging.getLogger("cortex.harness.llamacpp")


@attrs.define(eq=False)
class Slot:
    """One KV sequence: ``tokens[i]`` is cached at position ``i`` of sequence ``seq_id``."""

    seq_id: int
    tokens: list[int] = attrs.field(factory=list)
    owner: LlamaCppGeneration | None = None
    last_used: int = 0


@attrs.define
class PrefillStats:
    """Counters that make prefix reuse and batching measurable (tests and benchmarks read
    them)."""

    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0
    tokens_evaluated: int = 0
    evictions: int = 0
    batched_decodes: int = 0


def _message_text(content: Any) -> Any:
    """OpenAI content parts -> the plain string chat templates expect (other values as is)."""
    if isinstance(content, list):
        return "".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return content


class KvCacheExhausted(HarnessError):
    """Even after dropping every idle slot the batch does not fit in the KV cache."""


class LlamaCppModel:
    """A loaded GGUF model (implements :class:`cortex.harness.BatchedModel`)."""

    def __init__(
        self,
        *,
        lib: Any,
        model: Any,
        ctx: Any,
        path: Path,
        device: Device,
        settings: LlamaCppSettings,
        context_length: int,
        metadata: dict[str, str],
        max_batch: int,
    ) -> None:
        self._lib = lib
        self._model = model
        self._ctx = ctx
        self._vocab = lib.llama_model_get_vocab(model)
        self._memory = lib.llama_get_memory(ctx)
        self.path = path
        self.device = device
        self.settings = settings
        self.context_length = context_length
        self.metadata = metadata
        self.capabilities = frozenset({LOGPROBS, STRUCTURED_OUTPUT}) | template_capabilities(
            metadata.get("tokenizer.chat_template")
        )
        self.tool_call_style = tool_call_style(metadata.get("tokenizer.chat_template"))
        self.kv_cells = int(lib.llama_n_ctx(ctx))
        self.kv_tokens = self.kv_cells
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._n_batch = int(lib.llama_n_batch(ctx))
        self._batch = native.Batch(lib, self._n_batch)
        n_slots = int(lib.llama_n_seq_max(ctx))
        self.max_batch = max(1, min(max_batch, n_slots))
        self._slots = [Slot(seq_id=i) for i in range(n_slots)]
        self._clock = itertools.count(1)
        self._generations: set[LlamaCppGeneration] = set()
        self._pieces: dict[int, bytes] = {}
        self._formatter: Any = None
        self.stats = PrefillStats()
        self._weights_bytes = int(lib.llama_model_size(model))
        self._kv_bytes = self.kv_cells * kv_bytes_per_token(lib, model, metadata)

    # ---------------------------------------------------------------- text <-> tokens

    def _chat_formatter(self) -> Any:
        if self._formatter is None:
            template = self.metadata.get("tokenizer.chat_template")
            if not template:
                raise PromptError(
                    f"{self.path.name} has no chat template (tokenizer.chat_template); "
                    "use /v1/completions"
                )
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = self._lib.llama_vocab_eos(self._vocab)
            bos = self._lib.llama_vocab_bos(self._vocab)
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(eos),
                bos_token=self._token_text(bos),
                add_generation_prompt=True,
            )
        return self._formatter

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The GGUF's own chat template (Jinja, as transformers renders it), then tokenized with
        special tokens parsed; the template writes BOS itself, so none is added."""
        self._check_loaded()
        formatter = self._chat_formatter()
        plain = [{**m, "content": _message_text(m.get("content"))} for m in messages]
        try:
            rendered = formatter(messages=plain, tools=tools or None)
        except Exception as exc:  # jinja errors, raise_exception() in templates
            raise PromptError(f"the chat template failed: {exc}") from exc
        return native.tokenize(self._lib, self._vocab, rendered.prompt, False, True)

    def tokenize(self, text: str) -> list[int]:
        """Raw text for /v1/completions: BOS when the GGUF asks for it, specials parsed."""
        self._check_loaded()
        return native.tokenize(self._lib, self._vocab, text, True, True)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> text, control tokens dropped; a cut multi-byte character shows as
        U+FFFD, which tells the neuron's streamer to wait for the next token."""
        self._check_loaded()
        pieces = self._pieces
        out = bytearray()
        for token in token_ids:
            piece = pieces.get(token)
            if piece is None:
                if not 0 <= token < self.n_vocab:  # llama.cpp would abort the process
                    raise PromptError(f"token id {token} is outside the vocabulary")
                piece = native.token_piece(self._lib, self._vocab, token)
                pieces[token] = piece
            out += piece
        return out.decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- generation

    def start(self, prompt_ids: list[int], sampling: SamplingParams) -> LlamaCppGeneration:
        self._check_loaded()
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise PromptError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                f"{self.context_length} tokens"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.n_vocab]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary ({self.n_vocab})")
        sampler = build_sampler(
            self._lib,
            self.n_vocab,
            sampling,
            prompt_ids,
            history=self.context_length,
            vocab=self._vocab,
            tool_style=self.tool_call_style,
        )
        generation = LlamaCppGeneration(self, list(prompt_ids), sampler, sampling.logprobs)
        self._generations.add(generation)
        return generation

    def admit(self, generation: LlamaCppGeneration) -> None:
        """Give ``generation`` a slot, keeping (or copying) the longest cached prefix of its
        prompt; at least its last prompt token stays pending, for the logits of its first
        token."""
        self._check_loaded()
        if generation.slot is not None:
            return
        prompt = generation.tokens
        limit = len(prompt) - 1
        free = [s for s in self._slots if s.owner is None]
        if not free or len(self._slots) - len(free) >= self.max_batch:
            raise HarnessError(f"{self.max_batch} generations already run (max_batch)")
        best_free = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -len(s.tokens)))
        from_free = min(common_prefix(best_free.tokens, prompt), limit)
        source, from_running = None, 0
        if self.settings.prefix_cache:
            for slot in self._slots:
                if slot.owner is not None:
                    shared = min(common_prefix(slot.tokens, prompt), limit)
                    if shared > from_running:
                        source, from_running = slot, shared
        if source is not None and from_running > from_free:
            # a running sequence holds more of the prompt: share its cells
            slot = min(free, key=lambda s: (len(s.tokens), s.last_used))
            self._drop(slot)
            self._lib.llama_memory_seq_cp(self._memory, source.seq_id, slot.seq_id, 0, from_running)
            slot.tokens = source.tokens[:from_running]
        elif from_free > 0:
            slot = best_free
            self._trim(slot, from_free)
        else:
            slot = min(free, key=lambda s: (len(s.tokens) > 0, s.last_used))
            self._drop(slot)
        slot.owner = generation
        slot.last_used = next(self._clock)
        generation.slot = slot
        self.stats.prompt_tokens += len(prompt)
        self.stats.prompt_tokens_reused += len(slot.tokens)

    def step_batch(self, rows: Sequence[BatchRow]) -> list[Step | None]:
        """One ``llama_batch`` with every row's next ``n`` pending tokens (in parts of
        ``n_batch`` when larger); rows whose tokens are then all evaluated sample their next
        one."""
        self._check_loaded()
        entries: list[tuple[int, int, int, bool, int]] = []
        slots: set[Slot] = set()
        for index, (generation, count) in enumerate(rows):
            slot = generation.slot  # type: ignore[attr-defined]
            if slot is None or slot.owner is not generation or generation.closed:
                raise HarnessError("step_batch() with a generation that is not running")
            tokens = generation.tokens
            start = len(slot.tokens)
            if not 1 <= count <= len(tokens) - start:
                raise HarnessError(
                    f"step_batch() asked for {count} tokens of a generation with "
                    f"{len(tokens) - start} pending"
                )
            completes = start + count == len(tokens)
            if completes and len(tokens) >= self.context_length:
                raise HarnessError(f"the context of {self.context_length} tokens is full")
            for k in range(count):
                last = k == count - 1
                entries.append(
                    (tokens[start + k], start + k, slot.seq_id, completes and last, index)
                )
            slots.add(slot)
            slot.last_used = next(self._clock)
        results: list[Step | None] = [None] * len(rows)
        for part in _parts(entries, self._n_batch):
            self._batch.fill_entries(part)
            try:
                self._decode_evicting(slots)
            except BaseException:
                for slot in slots:  # a failed decode leaves what those sequences hold unknown
                    self._drop(slot)
                raise
            for token, _, _, _, index in part:
                rows[index][0].slot.tokens.append(token)
            self.stats.tokens_evaluated += len(part)
            self.stats.batched_decodes += 1
            sample = self._lib.llama_sampler_sample
            for position, (_, _, _, wants_logits, index) in enumerate(part):
                if wants_logits:
                    generation = rows[index][0]
                    token = int(sample(generation.sampler, self._ctx, position))
                    generation.tokens.append(token)
                    is_eos = bool(self._lib.llama_vocab_is_eog(self._vocab, token))
                    wanted = generation.logprobs
                    if wanted is None:
                        results[index] = Step(token_id=token, is_eos=is_eos)
                    else:
                        results[index] = self._with_logprobs(token, is_eos, position, wanted)
        return results

    def _with_logprobs(self, token: int, is_eos: bool, position: int, top: int) -> Step:
        """The step with its log-probabilities: ``log_softmax`` of the raw logits of that batch
        row (before the sampler chain changed them)."""
        import numpy as np

        pointer = self._lib.llama_get_logits_ith(self._ctx, position)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)
        shifted = logits - logits.max()
        log_probs = shifted - np.log(np.exp(shifted).sum())
        best: tuple[tuple[int, float], ...] = ()
        if top > 0:
            ids = np.argpartition(-log_probs, min(top, self.n_vocab) - 1)[:top]
            ids = ids[np.argsort(-log_probs[ids], kind="stable")]
            best = tuple((int(i), float(log_probs[i])) for i in ids)
        return Step(token, is_eos=is_eos, logprob=float(log_probs[token]), top_logprobs=best)

    def _trim(self, slot: Slot, keep: int) -> None:
        """Drop the cached tokens of ``slot`` from position ``keep`` on (all of them when
        llama.cpp cannot cut a sequence, e.g. recurrent models)."""
        if keep >= len(slot.tokens):
            return
        if keep == 0 or not self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._drop(slot)
        else:
            del slot.tokens[keep:]

    def _decode_evicting(self, batch_slots: set[Slot]) -> None:
        """Decode the filled batch; when the cache is full, drop the least recently used idle
        slot (a saved prefix; running sequences are never evicted) and retry."""
        while True:
            try:
                native.decode(self._lib, self._ctx, self._batch)
                return
            except native.KvCacheFull:
                victims = [
                    s for s in self._slots if s.owner is None and s not in batch_slots and s.tokens
                ]
                if not victims:
                    raise KvCacheExhausted(
                        f"the KV cache ({self.kv_cells} tokens) cannot hold this batch"
                    ) from None
                self._drop(min(victims, key=lambda s: s.last_used))
                self.stats.evictions += 1

    def _drop(self, slot: Slot) -> None:
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens.clear()

    def _finish(self, generation: LlamaCppGeneration) -> None:
        slot = generation.slot
        if slot is not None and slot.owner is generation:
            slot.owner = None
            slot.last_used = next(self._clock)
            if not self.settings.prefix_cache:
                self._drop(slot)
        generation.slot = None
        self._generations.discard(generation)

    def reset(self) -> None:
        """Forget the KV cache kept for prefix reuse (running generations keep theirs)."""
        self._check_loaded()
        for slot in self._slots:
            if slot.owner is None and slot.tokens:
                self._drop(slot)

    # ---------------------------------------------------------------- memory

    def memory_bytes(self) -> int:
        """Weights plus the KV cache, which llama.cpp allocates in full when the context is made."""
        if self._ctx is None:
            return 0
        return self._weights_bytes + self._kv_bytes

    def unload(self) -> None:
        if self._ctx is None:
            return
        for generation in list(self._generations):
            generation.close()
        self._batch.free()
        self._lib.llama_free(self._ctx)
        self._ctx = None
        self._lib.llama_model_free(self._model)
        self._model = None

    def _check_loaded(self) -> None:
        if self._ctx is None:
            raise HarnessError(f"{self.path.name} has been unloaded")


def _parts(entries: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(entries), size):
        yield entries[i : i + size]


class LlamaCppGeneration:
    """One generation (implements :class:`cortex.harness.BatchedGeneration`)."""

    def __init__(
        self, model: LlamaCppModel, tokens: list[int], sampler: Any, logprobs: int | None = None
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.sampler = sampler
        self.logprobs = logprobs
        self.slot: Slot | None = None
        self.closed = False

    @property
    def pending_tokens(self) -> int:
        return len(self.tokens) - (len(self.slot.tokens) if self.slot is not None else 0)

    def step(self) -> Step:
        """One token, this generation alone (the scheduler uses ``step_batch`` instead)."""
        if self.closed:
            raise HarnessError("this generation is closed")
        if self.slot is None:
            self.model.admit(self)
        while True:
            step = self.model.step_batch([(self, min(self.pending_tokens, 1 << 30))])[0]
            if step is not None:
                return step

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.model._finish(self)
        self.model._lib.llama_sampler_free(self.sampler)
        self.sampler = None


def kv_bytes_per_token(lib: Any, model: Any, metadata: dict[str, str]) -> int:
    """Bytes one cached token takes across all layers (K and V in llama.cpp's default F16)."""
    arch = metadata.get("general.architecture", "llama")
    n_layer = int(lib.llama_model_n_layer(model))
    n_head = max(1, int(lib.llama_model_n_head(model)))
    n_head_kv = int(lib.llama_model_n_head_kv(model)) or n_head
    n_embd = int(lib.llama_model_n_embd(model))
    key_len = int(metadata.get(f"{arch}.attention.key_length") or n_embd // n_head)
    value_len = int(metadata.get(f"{arch}.attention.value_length") or n_embd // n_head)
    return n_layer * n_head_kv * (key_len + value_len) * 2
