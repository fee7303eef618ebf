"""A GGUF model resident on one device, and its step-wise generations.

One llama.cpp context holds a *unified* KV cache of ``kv_cells`` tokens shared by up to
``parallel`` sequences (llama-server's ``-np N -kvu``). Each sequence id is a *slot*; a generation
borrows a slot while it runs. Slots are a cache, not a reservation:

* a generation that starts looks for the free slot whose cached tokens share the longest prefix
  with its prompt and evaluates only the rest (prefix reuse: a chat that grows by one turn
  re-evaluates one turn, not the whole conversation);
* with more live generations than slots, a generation takes the most recently used slot (streams
  step in turn, so that one is needed last); the one that lost it re-evaluates its tokens on its
  next step (correct, just slower);
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
    batched_decodes: int = 0


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


class KvCacheExhausted(HarnessError):
    """Even after evicting every other sequence the batch does not fit in the KV cache."""


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
        """One step of ``generation``: make the KV cache hold all its tokens, then sample.

        A generation whose only missing token is its last one is decoded together with every
        other live generation in the same state (one llama.cpp batch, one row each), and the
        others' next tokens are kept for their own next ``step`` — continuous batching without a
        scheduler: while streams take turns token by token, each turn costs one decode for all.
        """
        self._check_loaded()
        if generation.ready is not None:
            token, generation.ready = generation.ready, None
            return self._emit(generation, token)
        tokens = generation.tokens
        if len(tokens) >= self.context_length:
            raise HarnessError(f"the context of {self.context_length} tokens is full")
        slot = generation.slot
        if slot is None or slot.owner is not generation:
            slot = self._claim_slot(generation)
        first = generation.generated == 0
        companions = (
            self._companions(generation)
            if self.settings.batch_streams and not first and len(slot.tokens) == len(tokens) - 1
            else []
        )
        token = self._decode_together(generation, companions) if companions else None
        if token is None:
            reused = self._evaluate(slot, tokens)
            if first:
                self.stats.prompt_tokens += len(tokens)
                self.stats.prompt_tokens_reused += reused
            token = int(self._lib.llama_sampler_sample(generation.sampler, self._ctx, -1))
        slot.last_used = next(self._clock)
        return self._emit(generation, token)

    def _emit(self, generation: LlamaCppGeneration, token: int) -> Step:
        generation.tokens.append(token)
        generation.generated += 1
        return Step(token_id=token, is_eos=bool(self._lib.llama_vocab_is_eog(self._vocab, token)))

    def _companions(self, generation: LlamaCppGeneration) -> list[LlamaCppGeneration]:
        """Other live generations that need exactly one token evaluated (their last sampled one)
        and will step again: they can share this step's batch."""
        out = []
        for other in sorted(self._generations, key=lambda g: g.slot.seq_id if g.slot else -1):
            slot = other.slot
            if (
                other is generation
                or other.ready is not None
                or other.generated == 0
                or slot is None
                or slot.owner is not other
                or len(slot.tokens) != len(other.tokens) - 1
                or len(other.tokens) >= self.context_length
                or self._lib.llama_vocab_is_eog(self._vocab, other.tokens[-1])
            ):
                continue
            out.append(other)
            if len(out) + 1 >= self._n_batch:
                break
        return out

    def _decode_together(
        self, generation: LlamaCppGeneration, companions: list[LlamaCppGeneration]
    ) -> int | None:
        """One decode for ``generation`` and ``companions`` (one pending token each); returns
        ``generation``'s next token and leaves each companion's in its ``ready``. Returns None
        (nothing changed) when the shared KV cache has no room for all of them at once: the
        caller then decodes ``generation`` alone, evicting as usual."""
        members: list[tuple[LlamaCppGeneration, Slot]] = []
        for member in (generation, *companions):
            assert member.slot is not None
            members.append((member, member.slot))
        self._batch.fill_rows([(m.tokens[-1], len(s.tokens), s.seq_id) for m, s in members])
        try:
            self._decode_evicting({s for _, s in members})
        except KvCacheExhausted:
            return None  # llama.cpp left the cache as it was
        except BaseException:
            for _, slot in members:
                self._drop(slot)
            raise
        for member, slot in members:
            slot.tokens.append(member.tokens[-1])
        self.stats.tokens_evaluated += len(members)
        self.stats.batched_decodes += 1
        sample = self._lib.llama_sampler_sample
        token = int(sample(generation.sampler, self._ctx, 0))
        for row, (companion, slot) in enumerate(members[1:], start=1):
            companion.ready = int(sample(companion.sampler, self._ctx, row))
            slot.last_used = next(self._clock)
        return token

    def _claim_slot(self, generation: LlamaCppGeneration) -> Slot:
        free = [s for s in self._slots if s.owner is None]
        if free:
            slot = max(
                free, key=lambda s: (common_prefix(s.tokens, generation.tokens), -s.last_used)
            )
        else:
            # Streams step in turn, so the least recently used slot belongs to the stream whose
            # turn is next: stealing it would make every stream re-evaluate every round. The most
            # recently used one costs a single re-evaluation per round.
            slot = max(self._slots, key=lambda s: s.last_used)
            assert slot.owner is not None
            slot.owner.slot = None
            self.stats.evictions += 1
        slot.owner = generation
        generation.slot = slot
        # Keep only what this generation shares with the slot's previous tokens, so an owned slot
        # always caches a prefix of its owner's tokens (what batching relies on).
        self._trim(slot, common_prefix(slot.tokens, generation.tokens))
        return slot

    def _trim(self, slot: Slot, keep: int) -> None:
        """Drop the cached tokens of ``slot`` from position ``keep`` on (all of them when
        llama.cpp cannot cut a sequence, e.g. recurrent models)."""
        if keep >= len(slot.tokens):
            return
        if keep == 0 or not self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._drop(slot)
        else:
            del slot.tokens[keep:]

    def _evaluate(self, slot: Slot, target: list[int]) -> int:
        """Bring ``slot`` to ``target`` (minus nothing: the last token's logits are needed, so at
        least one token is always evaluated). Returns how many cached tokens were kept."""
        self._trim(slot, min(common_prefix(slot.tokens, target), len(target) - 1))
        keep = len(slot.tokens)
        try:
            for chunk in _chunks(target[keep:], self._n_batch):
                self._batch.fill(chunk, len(slot.tokens), slot.seq_id)
                self._decode_evicting({slot})
                slot.tokens.extend(chunk)
                self.stats.tokens_evaluated += len(chunk)
        except BaseException:
            self._drop(slot)
            raise
        return keep

    def _decode_evicting(self, batch_slots: set[Slot]) -> None:
        """Decode the filled batch; when the shared cache is full, evict the least recently used
        sequence outside the batch (idle ones first) and retry."""
        while True:
            try:
                native.decode(self._lib, self._ctx, self._batch)
                return
            except native.KvCacheFull:
                victims = [s for s in self._slots if s not in batch_slots and s.tokens]
                if not victims:
                    raise KvCacheExhausted(
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
        generation.ready = None
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
        self.ready: int | None = None  # next token, sampled early in another stream's batch
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
