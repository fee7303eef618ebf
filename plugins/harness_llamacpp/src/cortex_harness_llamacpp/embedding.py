"""Embedding GGUFs: served on ``POST /v1/embeddings`` in llama.cpp's embedding mode.

**Which GGUF is an embedding model** (:func:`embedding_pooling`, decided from the file before
any context is made, so a chat GGUF loads exactly as before). Measured on llama.cpp as
llama-cpp-python 0.3.36 ships it: ``llama_model_has_encoder`` is false and
``llama_model_has_decoder`` true for a BERT GGUF as for a llama one (those two only tell T5
apart), so they cannot be the rule; what tells is the metadata ``convert_hf_to_gguf.py`` writes:

1. the ``pooling`` setting names a pooling (``mean``, ``cls``, ``last``): embedding mode, with
   it, whatever the file is (like ``llama-server --embedding --pooling``);
2. ``{arch}.pooling_type`` is ``mean``/``cls``/``last`` (the converter writes it for every
   sentence-transformers repo: BERT, nomic-bert, jina-bert, gte, and decoder embedders such as
   Qwen3-Embedding): embedding mode with that pooling; ``rank`` (a reranker such as
   bge-reranker) is refused, since its output is a relevance score, not a vector;
3. ``{arch}.attention.causal`` is false (the BERT family writes it: a bidirectional encoder) or
   the model has no decoder (``t5encoder``), and it is not a diffusion model (bidirectional
   generators): embedding mode with mean pooling, what sentence-transformers (and the torch
   harness) use for a plain encoder;
4. anything else is a generation model.

**The context.** ``embeddings = true`` and the pooling chosen above (llama.cpp reports it back
with ``llama_pooling_type``); ``n_batch = n_ubatch =`` the context, so any input the context
takes is evaluated in one micro-batch (llama.cpp requires it of non-causal models and pools a
sequence per micro-batch); one unified KV cache of one context for decoder embedders (encoders
such as BERT have none: ``llama_get_memory`` is NULL). The context is at most what the model
was trained for: an encoder's position table has no rows past it.

**A request** (:meth:`LlamaCppEmbeddingModel.embed`, on the device's worker thread): the inputs
are packed in order into ``llama_batch`` es of up to ``n_batch`` tokens and ``n_seq_max``
sequences, each input its own sequence (positions from 0); after each ``llama_decode``, one
pooled vector per sequence from ``llama_get_embeddings_seq``, normalised to unit length
(Euclidean, as llama-server does by default and ``llama_cpp.Llama.embed(normalize=True)``
computes) unless ``normalize_embeddings`` is off. The KV cache is cleared before every batch and
after the request, so nothing of one request survives into the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cortex.devices import Device
from cortex.harness import EMBEDDINGS, HarnessError, PromptError
from cortex_harness_llamacpp import native
from cortex_harness_llamacpp.settings import LlamaCppSettings

# llama.h's enum llama_pooling_type (also gguf.PoolingType): the values in ``{arch}.pooling_type``.
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
POOLING_NAMES = {POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last"}
_POOLING_BY_NAME = {name: value for value, name in POOLING_NAMES.items()}
EMBEDDING_ONLY = "this is an embedding model: use /v1/embeddings"


def embedding_pooling(
    lib: Any, model: Any, metadata: dict[str, str], settings: LlamaCppSettings, name: str
) -> int | None:
    """The pooling to serve this GGUF with in embedding mode, or ``None`` for a generation
    model (the rule is in the module docstring)."""
    if settings.pooling != "auto":
        return _POOLING_BY_NAME[settings.pooling]
    arch = metadata.get("general.architecture", "")
    declared = metadata.get(f"{arch}.pooling_type")
    if declared is not None:
        try:
            value = int(declared)
        except ValueError:
            raise HarnessError(f"{name}: {arch}.pooling_type is {declared!r}") from None
        if value == POOLING_RANK:
            raise HarnessError(
                f"{name} is a reranker ({arch}.pooling_type rank): its output is a relevance "
                "score, not an embedding, and cortex does not serve rerankers"
            )
        if value in POOLING_NAMES:
            return value
    bidirectional = metadata.get(f"{arch}.attention.causal", "").strip().lower() == "false"
    encoder_only = not lib.llama_model_has_decoder(model)
    if (bidirectional or encoder_only) and not lib.llama_model_is_diffusion(model):
        return POOLING_MEAN
    return None


def embedding_context_length(
    trained: int, requested: int | None, settings: LlamaCppSettings
) -> int:
    """The request's context when it names one, else the trained context capped by
    ``max_context``; never more than the trained context (an encoder has no position
    embeddings past it, and llama.cpp would abort the process on the lookup)."""
    if requested is not None:
        if requested < 16:
            raise HarnessError(f"context_length {requested} is too small (at least 16)")
        if trained and requested > trained:
            raise HarnessError(
                f"context_length {requested} exceeds what this embedding model was trained "
                f"for ({trained} tokens)"
            )
        return requested
    if trained <= 0:
        return settings.max_context
    return min(trained, settings.max_context)


def embedding_context_params(lib: Any, params: Any, context: int, pooling: int) -> Any:
    """``params`` (the harness's common context settings) made an embedding context of
    ``context`` tokens: pooled embeddings, the whole context in one micro-batch, as many
    sequences per batch as llama.cpp allows, one unified KV cache (a decoder embedder's)."""
    params.embeddings = True
    params.pooling_type = pooling
    params.n_ctx = -(-context // 256) * 256
    params.n_batch = context
    params.n_ubatch = context
    params.n_seq_max = max(1, min(context, lib.llama_max_parallel_sequences()))
    params.kv_unified = True
    return params


class LlamaCppEmbeddingModel:
    """A GGUF embedding model resident on one device (implements
    :class:`cortex.harness.EmbeddingModel` and the ``LoadedModel`` calls an embedding model
    answers). Every method runs on the device's worker thread."""

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
        from cortex_harness_llamacpp.model import kv_bytes_per_token

        self._lib = lib
        self._model = model
        self._ctx = ctx
        self._vocab = lib.llama_model_get_vocab(model)
        self._memory = lib.llama_get_memory(ctx)  # None for encoders (no KV cache)
        self.path = path
        self.device = device
        self.settings = settings
        self.context_length = context_length
        self.metadata = metadata
        self.capabilities = frozenset({EMBEDDINGS})
        self.pooling = POOLING_NAMES[int(lib.llama_pooling_type(ctx))]
        self.normalize = settings.normalize_embeddings
        n_out = (
            int(lib.llama_model_n_embd_out(model)) if hasattr(lib, "llama_model_n_embd_out") else 0
        )
        self.dimensions = n_out or int(lib.llama_model_n_embd(model))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_batch = min(int(lib.llama_n_batch(ctx)), int(lib.llama_n_ubatch(ctx)))
        self.n_seq_max = int(lib.llama_n_seq_max(ctx))
        self._batch = native.Batch(lib, self.n_batch)
        self.batches = 0  # llama_decode calls made (tests read it)
        self._weights_bytes = int(lib.llama_model_size(model))
        cells = int(lib.llama_n_ctx(ctx)) if self._memory is not None else 0
        self._kv_bytes = cells * kv_bytes_per_token(lib, model, metadata)
        self.output_bytes, self.logits_bytes = buffer_bytes(
            n_vocab=self.n_vocab,
            n_embd=int(lib.llama_model_n_embd(model)),
            n_batch=self.n_batch,
            n_seq_max=self.n_seq_max,
            causal=bool(lib.llama_get_causal_attn(ctx)),
        )

    # ---- the LoadedModel calls (an embedding model does not generate) -----------------

    def render_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        raise PromptError(EMBEDDING_ONLY)

    def start(self, prompt_ids: list[int], sampling: Any) -> Any:
        raise PromptError(EMBEDDING_ONLY)

    def tokenize(self, text: str) -> list[int]:
        """The text with the special tokens the GGUF asks for (BERT's CLS/SEP, an EOS for
        last-token pooling), special-token text parsed: what llama-server embeds."""
        self._check_loaded()
        return native.tokenize(self._lib, self._vocab, text, True, True)

    def decode(self, token_ids: list[int]) -> str:
        self._check_loaded()
        out = bytearray()
        for token in token_ids:
            if not 0 <= token < self.n_vocab:
                raise PromptError(f"token id {token} is outside the vocabulary")
            out += native.token_piece(self._lib, self._vocab, token)
        return out.decode("utf-8", errors="replace")

    def reset(self) -> None:
        self._check_loaded()
        self._clear()

    def memory_bytes(self) -> int:
        """Weights, the KV cache of a decoder embedder (allocated in full with the context),
        and what a full batch makes llama.cpp hold per token: its output buffer and, for a
        decoder, the LM head's logits (:func:`buffer_bytes`). The rest of the compute buffers
        is not counted, as for generation models."""
        if self._ctx is None:
            return 0
        return self._weights_bytes + self._kv_bytes + self.output_bytes + self.logits_bytes

    def unload(self) -> None:
        if self._ctx is None:
            return
        self._batch.free()
        self._lib.llama_free(self._ctx)
        self._ctx = None
        self._lib.llama_model_free(self._model)
        self._model = None

    # ---- embeddings ---------------------------------------------------------------------

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One vector per input (token ids), several inputs per ``llama_decode``."""
        self._check_loaded()
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise PromptError(f"input[{i}] has no tokens")
            wrong = [t for t in tokens if not 0 <= t < self.n_vocab]
            if wrong:
                raise PromptError(
                    f"input[{i}] has token id {wrong[0]}, outside the vocabulary "
                    f"(0-{self.n_vocab - 1})"
                )
            if len(tokens) > self.n_batch:
                raise PromptError(
                    f"input[{i}] has {len(tokens)} tokens; {self.path.name} takes at most "
                    f"{self.n_batch}"
                )
        vectors: list[list[float]] = []
        try:
            for group in pack(inputs, self.n_batch, self.n_seq_max):
                vectors.extend(self._embed_group(group))
        finally:
            self._clear()
        return vectors

    def _embed_group(self, group: list[list[int]]) -> list[list[float]]:
        import numpy as np

        entries = [
            (token, position, seq, True, 0)
            for seq, tokens in enumerate(group)
            for position, token in enumerate(tokens)
        ]
        self._batch.fill_entries(entries)
        self._clear()
        try:
            native.decode(self._lib, self._ctx, self._batch)
        except native.KvCacheFull:  # the cache was emptied and holds a whole batch
            raise HarnessError("llama.cpp found no room for an embedding batch") from None
        self.batches += 1
        out = []
        for seq in range(len(group)):
            pointer = self._lib.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:
                raise HarnessError(f"llama.cpp returned no pooled embedding for sequence {seq}")
            vector = np.ctypeslib.as_array(pointer, shape=(self.dimensions,)).astype(np.float64)
            if self.normalize:
                norm = float(np.linalg.norm(vector))
                if norm > 0.0:
                    vector = vector / norm
            out.append(vector.tolist())
        return out

    def _clear(self) -> None:
        if self._memory is not None:
            self._lib.llama_memory_clear(self._memory, False)

    def _check_loaded(self) -> None:
        if self._ctx is None:
            raise HarnessError(f"{self.path.name} has been unloaded")


def buffer_bytes(
    *, n_vocab: int, n_embd: int, n_batch: int, n_seq_max: int, causal: bool
) -> tuple[int, int]:
    """(output buffer, LM-head logits) bytes of an embedding context after a full batch.

    In embedding mode llama.cpp marks every token of a batch as an output, and its output
    buffer (``llama_context::output_reserve``) holds logits *and* an embedding for every output
    row, float32: ``max(tokens, n_seq_max) x (n_vocab + n_embd) x 4``; it grows to a full
    batch on the first one and is never shrunk. A decoder embedder's graph also computes the
    LM head for every token of a micro-batch (``n_ubatch x n_vocab x 4`` in the compute
    buffer; measured: 147 MiB of compute buffer for 256 tokens of a 150k-token vocabulary, 0.7
    MiB for a BERT of the same vocabulary, which has no LM head). With a large vocabulary
    and context these dominate: bge-m3 (250k tokens) at 8192 tokens is 8 GB of output buffer."""
    output = max(n_batch, n_seq_max) * (n_vocab + n_embd) * 4
    logits = n_batch * n_vocab * 4 if causal else 0
    return output, logits


def pack(inputs: list[list[int]], n_batch: int, n_seq_max: int) -> list[list[list[int]]]:
    """The inputs in order, in groups of at most ``n_batch`` tokens and ``n_seq_max`` inputs
    (each input is at most ``n_batch`` tokens)."""
    groups: list[list[list[int]]] = []
    current: list[list[int]] = []
    tokens = 0
    for ids in inputs:
        if current and (tokens + len(ids) > n_batch or len(current) >= n_seq_max):
            groups.append(current)
            current, tokens = [], 0
        current.append(ids)
        tokens += len(ids)
    if current:
        groups.append(current)
    return groups
