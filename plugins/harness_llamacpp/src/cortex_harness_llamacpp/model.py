"""A GGUF model resident on one device, and its step-wise generations.

One llama.cpp context holds a *unified* KV cache of ``kv_cells`` tokens shared by up to
``parallel`` sequences (llama-server's ``-np N -kvu``). Each sequence id is a *slot*; a generation
borrows a slot while it runs. Slots are a cache, not a reservation:

* a generation that starts looks for the free slot whose cached tokens share the longest prefix
  with its prompt and evaluates only the rest (prefix reuse: a chat that grows by one turn
  re-evaluates one turn, not the whole conversation);
* with more live generations than slots, a generation takes the least recently used slot; the
  one that lost it re-evaluates its tokens on its next step (correct, just slower);
* when the shared cache is full, idle slots and then other generations' slots are evicted.

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
from cortex.harness import HarnessError, PromptError, SamplingParams, Step
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
    """Counters that make prefix reuse measurable (tests and ``/metrics`` read them)."""

    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0
    tokens_evaluated: int = 0
    evictions: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chunks(tokens: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(tokens), size):
        yield tokens[i : i + size]


def _message_text(content: Any) -> Any:
    """OpenAI content parts -> the plain string chat templates expect (other values as is)."""
    if isinstance(content, list):
        return "".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return content


class LlamaCppModel:
    """A loaded GGUF model (implements :class:`cortex.harness.LoadedModel`)."""

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
        self.kv_cells = int(lib.llama_n_ctx(ctx))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._n_batch = int(lib.llama_n_batch(ctx))
        self._batch = native.Batch(lib, self._n_batch)
        n_slots = int(lib.llama_n_seq_max(ctx))
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
            self._lib, self.n_vocab, sampling, prompt_ids, history=self.context_length
        )
        generation = LlamaCppGeneration(self, list(prompt_ids), sampler)
        self._generations.add(generation)
        return generation

    def _advance(self, generation: LlamaCppGeneration) -> Step:
        """One step of ``generation``: make the KV cache hold all its tokens, then sample."""
        self._check_loaded()
        tokens = generation.tokens
        if len(tokens) >= self.context_length:
            raise HarnessError(f"the context of {self.context_length} tokens is full")
        slot = generation.slot
        if slot is None or slot.owner is not generation:
            slot = self._claim_slot(generation)
        first = generation.generated == 0
        reused = self._evaluate(slot, tokens)
        if first:
            self.stats.prompt_tokens += len(tokens)
            self.stats.prompt_tokens_reused += reused
        token = int(self._lib.llama_sampler_sample(generation.sampler, self._ctx, -1))
        tokens.append(token)
        generation.generated += 1
        slot.last_used = next(self._clock)
        return Step(token_id=token, is_eos=bool(self._lib.llama_vocab_is_eog(self._vocab, token)))

    def _claim_slot(self, generation: LlamaCppGeneration) -> Slot:
        free = [s for s in self._slots if s.owner is None]
        if free:
            slot = max(
                free, key=lambda s: (common_prefix(s.tokens, generation.tokens), -s.last_used)
            )
        else:
            slot = min(self._slots, key=lambda s: s.last_used)
            assert slot.owner is not None
            slot.owner.slot = None
            self.stats.evictions += 1
        slot.owner = generation
        generation.slot = slot
        return slot

    def _evaluate(self, slot: Slot, target: list[int]) -> int:
        """Bring ``slot`` to ``target`` (minus nothing: the last token's logits are needed, so at
        least one token is always evaluated). Returns how many cached tokens were kept."""
        lib = self._lib
        keep = min(common_prefix(slot.tokens, target), len(target) - 1)
        if keep < len(slot.tokens):
            if not lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
                lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                keep = 0
            del slot.tokens[keep:]
        try:
            for chunk in _chunks(target[keep:], self._n_batch):
                self._batch.fill(chunk, len(slot.tokens), slot.seq_id)
                self._decode_evicting(slot)
                slot.tokens.extend(chunk)
                self.stats.tokens_evaluated += len(chunk)
        except BaseException:
            self._drop(slot)
            raise
        return keep

    def _decode_evicting(self, slot: Slot) -> None:
        """Decode the filled batch; when the shared cache is full, evict the least recently used
        other sequence (idle ones first) and retry."""
        while True:
            try:
                native.decode(self._lib, self._ctx, self._batch)
                return
            except native.KvCacheFull:
                victims = [s for s in self._slots if s is not slot and s.tokens]
                if not victims:
                    raise HarnessError(
                        f"the KV cache ({self.kv_cells} tokens) cannot hold this sequence"
                    ) from None
                victim = min(victims, key=lambda s: (s.owner is not None, s.last_used))
                self._drop(victim)
                self.stats.evictions += 1

    def _drop(self, slot: Slot) -> None:
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens.clear()

    def _finish(self, generation: LlamaCppGeneration) -> None:
        slot = generation.slot
        if slot is not None and slot.owner is generation:
            slot.owner = None
            if not self.settings.prefix_cache:
                self._drop(slot)
        generation.slot = None
        self._generations.discard(generation)

    def reset(self) -> None:
        """Forget the KV cache kept for prefix reuse (live generations keep theirs)."""
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


class LlamaCppGeneration:
    """One generation (implements :class:`cortex.harness.Generation`)."""

    def __init__(self, model: LlamaCppModel, tokens: list[int], sampler: Any) -> None:
        self.model = model
        self.tokens = tokens
        self.sampler = sampler
        self.slot: Slot | None = None
        self.generated = 0
        self.closed = False

    def step(self) -> Step:
        if self.closed:
            raise HarnessError("this generation is closed")
        return self.model._advance(self)

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
