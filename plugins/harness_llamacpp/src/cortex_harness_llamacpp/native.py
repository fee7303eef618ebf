"""Thin, typed wrappers over llama-cpp-python's ctypes bindings of ``llama.h``.

The high-level ``llama_cpp.Llama`` keeps one sequence per context and owns its sampler, which is
the opposite of what a neuron needs (many interleaved generations, each with its own sampler and
KV sequence). So the harness talks to the C API directly, through these helpers; everything here
runs on the device worker thread that owns the model. ``llama_cpp`` is imported lazily.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Sequence
from typing import Any

from cortex.harness import DeviceFault, HarnessError

log = logging.getLogger("cortex.harness.llamacpp")

_INIT_LOCK = threading.Lock()
_initialised = False
_log_callback: Any = None  # kept referenced: llama.cpp holds a raw pointer to it

# ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR, CONT) -> logging level; llama.cpp's INFO is a
# page of chatter per load, so it goes to DEBUG. CONT continues the previous message.
_LEVELS = {
    0: logging.DEBUG,
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.WARNING,
    4: logging.ERROR,
}
_CONT = 5
_last_level = logging.DEBUG
# The last few warnings and errors llama.cpp logged: a failed load returns NULL, and these say why.
_recent_problems: collections.deque[str] = collections.deque(maxlen=8)


def llama() -> Any:
    """The ``llama_cpp`` module, with the backend initialised and llama.cpp's log routed into
    Python logging (its INFO chatter at DEBUG), once per process."""
    global _initialised, _log_callback
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise HarnessError(
            "llama-cpp-python is not installed: pip install llama-cpp-python "
            "(see docs/harnesses.md for the CUDA build)"
        ) from exc
    with _INIT_LOCK:
        if not _initialised:
            llama_cpp.llama_backend_init()

            @llama_cpp.llama_log_callback
            def _route(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                global _last_level
                if level != _CONT:
                    _last_level = _LEVELS.get(level, logging.DEBUG)
                    if b"failed to find a memory slot" in text:
                        _last_level = logging.DEBUG  # a full KV cache: the harness evicts
                    elif b"n_ctx_seq" in text and b"n_ctx_train" in text:
                        # the unified KV cache is larger than one sequence's context; the
                        # harness bounds each sequence by the context itself
                        _last_level = logging.DEBUG
                message = text.decode("utf-8", errors="replace").rstrip()
                if message:
                    log.log(_last_level, "%s", message)
                    if _last_level >= logging.WARNING:
                        _recent_problems.append(message)

            _log_callback = _route
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            _initialised = True
    return llama_cpp


def take_recent_problems() -> list[str]:
    """The warnings and errors llama.cpp logged since the last call (and forget them)."""
    problems = list(_recent_problems)
    _recent_problems.clear()
    return problems


def looks_like_out_of_memory(problems: list[str]) -> bool:
    text = " ".join(problems).lower()
    return "out of memory" in text or "failed to allocate" in text or "unable to allocate" in text


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (built with CUDA, Metal, ...)."""
    return bool(llama().llama_supports_gpu_offload())


def model_metadata(lib: Any, model: Any) -> dict[str, str]:
    """Every GGUF key/value of a loaded model, as strings (llama.cpp renders arrays briefly)."""
    out: dict[str, str] = {}
    size = 4096
    buf = ctypes.create_string_buffer(size)
    for i in range(lib.llama_model_meta_count(model)):
        n = lib.llama_model_meta_key_by_index(model, i, buf, size)
        if n < 0:
            continue
        key = buf.value.decode("utf-8", errors="replace")
        n = lib.llama_model_meta_val_str_by_index(model, i, buf, size)
        if n >= size:
            bigger = ctypes.create_string_buffer(n + 1)
            lib.llama_model_meta_val_str_by_index(model, i, bigger, n + 1)
            out[key] = bigger.value.decode("utf-8", errors="replace")
        elif n >= 0:
            out[key] = buf.value.decode("utf-8", errors="replace")
    return out


def tokenize(lib: Any, vocab: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """Text -> token ids (growing the buffer when llama.cpp says it was too small)."""
    data = text.encode("utf-8")
    capacity = max(16, len(data) + 8)
    for _ in range(2):
        buf = (lib.llama_token * capacity)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        capacity = -n
    raise HarnessError(f"llama.cpp could not tokenize a text of {len(data)} bytes")


def token_piece(lib: Any, vocab: Any, token: int, special: bool = False) -> bytes:
    """The bytes one token stands for (empty for control tokens unless ``special``)."""
    size = 64
    buf = ctypes.create_string_buffer(size)
    n = lib.llama_token_to_piece(vocab, token, buf, size, 0, special)
    if n < 0:
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_token_to_piece(vocab, token, buf, size, 0, special)
    return buf.raw[: max(n, 0)]


class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, one sequence id per token."""

    def __init__(self, lib: Any, capacity: int) -> None:
        self._lib = lib
        self.capacity = capacity
        self.batch = lib.llama_batch_init(capacity, 0, 1)

    def fill_entries(self, entries: Sequence[tuple[int, int, int, bool, Any]]) -> None:
        """One ``(token, position, seq_id, wants_logits, _)`` per row: prompt chunks and decode
        tokens of several sequences in one batch. After the decode, ``llama_get_logits_ith(ctx,
        i)`` (and ``llama_sampler_sample(..., i)``) read the logits of row ``i``."""
        if not 0 < len(entries) <= self.capacity:
            raise ValueError(f"batch of {len(entries)} rows (capacity {self.capacity})")
        batch = self.batch
        batch.n_tokens = len(entries)
        token, pos, n_seq_id, seq_id, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        for i, (tok, position, seq, wants_logits, _) in enumerate(entries):
            token[i] = tok
            pos[i] = position
            n_seq_id[i] = 1
            seq_id[i][0] = seq
            logits[i] = wants_logits

    def free(self) -> None:
        if self.batch is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None


class KvCacheFull(Exception):
    """``llama_decode`` found no free KV cells for the batch (status 1): evict and retry."""


def decode(lib: Any, ctx: Any, batch: Batch) -> None:
    """Run one batch; map llama.cpp's status codes onto cortex's error types."""
    status = lib.llama_decode(ctx, batch.batch)
    if status == 0:
        return
    if status == 1:
        raise KvCacheFull()
    if status == 2:
        raise HarnessError("llama.cpp aborted the decode")
    if status == -1:
        raise HarnessError("llama.cpp rejected the batch as invalid")
    raise DeviceFault(f"llama_decode failed with status {status}")
