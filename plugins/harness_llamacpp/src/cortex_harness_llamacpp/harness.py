"""The llama.cpp harness: GGUF repos onto a CPU or a CUDA device through llama-cpp-python.

It answers the neuron's questions before anything is downloaded (does this repo have GGUF files,
which files does a load need, how much memory will it take) and loads a fetched snapshot on the
device's worker thread. ``llama_cpp`` is imported only inside :meth:`LlamaCppHarness.load`, so a
gateway that has this plugin installed never pays for it.
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path
from typing import Any

import attrs

from cortex.devices import Device
from cortex.harness import (
    DeviceOutOfMemory,
    HarnessError,
    LoadedModel,
    LoadOptions,
    capacity_of,
)
from cortex.source import Preflight, WeightFormat
from cortex_harness_llamacpp import gguf_files
from cortex_harness_llamacpp.settings import LlamaCppSettings, resolve_settings

log = logging.getLogger("cortex.harness.llamacpp")

MIB = 2**20
# Before download only the file size is known. F16 KV per token relative to the weights of a
# ~4.5-bit quant: Llama-3-8B Q4_K_M 4.9 GB -> 128 KiB/token, Qwen2.5-32B Q4_K_M 19.9 GB ->
# 256 KiB/token. size/40000 matches the first and overestimates the second: safe for placement.
_KV_PER_TOKEN_DIVISOR = 40_000
_KV_PER_TOKEN_MIN = 4 * 1024
_KV_PER_TOKEN_MAX = 1 * MIB
# Compute buffers and scratch space on top of weights and KV cache.
_OVERHEAD_FIXED = 64 * MIB
_OVERHEAD_FRACTION = 0.02
# llama.cpp's "all layers" (what llama_cpp.Llama passes for n_gpu_layers=-1).
_ALL_LAYERS = 0x7FFFFFFF


def estimated_kv_bytes_per_token(weight_bytes: int) -> int:
    guess = weight_bytes // _KV_PER_TOKEN_DIVISOR
    return max(_KV_PER_TOKEN_MIN, min(_KV_PER_TOKEN_MAX, guess))


@attrs.frozen
class LlamaCppHarness:
    """Registered as ``llamacpp``. ``max_devices``: a load may span up to this many CUDA
    devices of a node (llama.cpp's layer split)."""

    name: str = "llamacpp"
    max_devices: int = 8

    def accepts(self, preflight: Preflight) -> bool:
        if preflight.weight_format not in (WeightFormat.GGUF, WeightFormat.BOTH):
            return False
        return bool(gguf_files.matching_ggufs(preflight.file_names(), None))

    def files_needed(self, preflight: Preflight) -> list[str]:
        """Only the chosen GGUF (all its shards when it is split), never the other quants."""
        if not preflight.gguf_file:
            return []
        return gguf_files.shard_group(preflight.gguf_file, preflight.file_names())

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        """Weights (the file size) + the KV cache of the load's batching capacity
        (``kv_tokens`` cells, at least one context) + overhead. Without a local file the KV
        size per token is estimated from the file size."""
        settings = resolve_settings(options)
        weights = sum(preflight.size_of(name) for name in self.files_needed(preflight))
        context = options.context_length or settings.max_context
        kv = kv_cells_for(context, options) * estimated_kv_bytes_per_token(weights)
        return int(weights + kv + _OVERHEAD_FIXED + weights * _OVERHEAD_FRACTION)

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        settings = resolve_settings(options)
        path = choose_local_gguf(snapshot, options.quant)
        return load_gguf(path, device, settings, options.context_length, options)


def kv_cells_for(context: int, options: LoadOptions) -> int:
    """KV cells of a load: its ``kv_tokens`` capacity (:func:`cortex.harness.capacity_of`),
    rounded up to llama.cpp's multiple of 256."""
    _, kv_tokens = capacity_of(context, options)
    return -(-kv_tokens // 256) * 256


def choose_local_gguf(snapshot: Path, quant: str | None) -> Path:
    """The GGUF file to open in a fetched snapshot: the one matching ``quant`` (its first shard
    when split), or the only one there is."""
    names = gguf_files.local_ggufs(snapshot)
    matches = gguf_files.matching_ggufs(names, quant)
    groups = {gguf_files.first_shard(gguf_files.shard_group(n, names)) for n in matches}
    if len(groups) > 1 and quant:
        groups = set(gguf_files.exact_quant_matches(groups, quant)) or groups
    if len(groups) == 1:
        return snapshot / groups.pop()
    if not names:
        raise HarnessError(f"no .gguf model file in {snapshot}")
    if not groups:
        raise HarnessError(f"no GGUF file matches quant {quant!r}; available: {', '.join(names)}")
    raise HarnessError(
        f"{len(groups)} GGUF files match quant {quant!r} ({', '.join(sorted(groups))}); "
        "name the quant more precisely"
    )


def load_gguf(
    path: Path,
    device: Device,
    settings: LlamaCppSettings,
    context_length: int | None = None,
    options: LoadOptions | None = None,
) -> LoadedModel:
    """Open ``path`` on ``device``: all layers on the GPU for a CUDA device (which needs a
    llama.cpp built with CUDA), else on the CPU with the configured threads. An embedding GGUF
    (embedding.py says which) gets an embedding context, any other a batched generation one.
    Runs on the device's worker thread."""
    from cortex_harness_llamacpp import native
    from cortex_harness_llamacpp.embedding import embedding_pooling
    from cortex_harness_llamacpp.model import LlamaCppModel

    lib = native.llama()
    started = time.monotonic()
    model_params = lib.llama_model_default_params()
    spans = list(options.devices) if options is not None else []
    split_keepalive = None
    if len(spans) > 1:
        if any(d.kind != "cuda" for d in spans):
            raise HarnessError("a llama.cpp load spans CUDA devices only (the CPU is one device)")
        if not lib.llama_supports_gpu_offload():
            raise HarnessError(
                "this llama-cpp-python was built without GPU support, so it cannot split a "
                "model over GPUs"
            )
        main_gpu, shares = split_parameters(spans, int(lib.llama_max_devices()))
        model_params.n_gpu_layers = _ALL_LAYERS
        model_params.split_mode = lib.LLAMA_SPLIT_MODE_LAYER
        model_params.main_gpu = main_gpu
        split_keepalive = (ctypes.c_float * len(shares))(*shares)  # read during the load
        model_params.tensor_split = split_keepalive
    elif device.kind == "cuda":
        if not lib.llama_supports_gpu_offload():
            raise HarnessError(
                "this llama-cpp-python was built without GPU support, so it cannot load onto "
                f'{device.key}; rebuild it with CMAKE_ARGS="-DGGML_CUDA=on" pip install '
                "--force-reinstall --no-cache-dir llama-cpp-python, or load onto cpu"
            )
        model_params.n_gpu_layers = _ALL_LAYERS
        model_params.split_mode = lib.LLAMA_SPLIT_MODE_NONE
        model_params.main_gpu = device.index
    elif device.kind == "cpu":
        model_params.n_gpu_layers = 0
    else:
        raise HarnessError(f"the llama.cpp harness cannot load onto a {device.kind!r} device")

    native.take_recent_problems()
    model = lib.llama_model_load_from_file(str(path).encode("utf-8"), model_params)
    if model is None:
        raise _load_failure(f"llama.cpp could not load {path.name} onto {device.key}")
    try:
        metadata = native.model_metadata(lib, model)
        pooling = embedding_pooling(lib, model, metadata, settings, path.name)
        if pooling is not None:
            return _load_embedding_gguf(
                lib, model, metadata, path, device, settings, context_length, pooling
            )
        context = resolve_context_length(
            int(lib.llama_model_n_ctx_train(model)), context_length, settings
        )
        options = options or LoadOptions()
        max_batch, _ = capacity_of(context, options)
        cells = kv_cells_for(context, options)
        _check_fits(lib, model, metadata, device, cells, path.name, spans)
        params = _context_params(lib, device, settings, cells, max_batch)
        ctx = lib.llama_init_from_model(model, params)
        if ctx is None:
            raise _load_failure(
                f"llama.cpp could not create a KV cache of {cells} cells for {path.name} "
                f"on {device.key}"
            )
    except BaseException:
        lib.llama_model_free(model)
        raise
    loaded = LlamaCppModel(
        lib=lib,
        model=model,
        ctx=ctx,
        path=path,
        device=device,
        settings=settings,
        context_length=context,
        metadata=metadata,
        max_batch=max_batch,
    )
    log.info(
        "loaded %s on %s in %.2fs: context %d, %d KV cells, max_batch %d, %.1f MiB",
        path.name,
        device.key,
        time.monotonic() - started,
        context,
        loaded.kv_cells,
        loaded.max_batch,
        loaded.memory_bytes() / MIB,
    )
    return loaded


def _load_embedding_gguf(
    lib: Any,
    model: Any,
    metadata: dict[str, str],
    path: Path,
    device: Device,
    settings: LlamaCppSettings,
    requested_context: int | None,
    pooling: int,
) -> LoadedModel:
    """An embedding context for the loaded ``model`` (embedding.py says how; the caller frees
    the model if this raises)."""
    from cortex_harness_llamacpp.embedding import (
        POOLING_NAMES,
        LlamaCppEmbeddingModel,
        embedding_context_length,
        embedding_context_params,
    )

    started = time.monotonic()
    context = embedding_context_length(
        int(lib.llama_model_n_ctx_train(model)), requested_context, settings
    )
    params = embedding_context_params(
        lib, base_context_params(lib, device, settings), context, pooling
    )
    _check_fits(lib, model, metadata, device, int(params.n_ctx), path.name)
    ctx = lib.llama_init_from_model(model, params)
    if ctx is None:
        raise _load_failure(
            f"llama.cpp could not create an embedding context of {context} tokens for "
            f"{path.name} on {device.key}"
        )
    try:
        reported = int(lib.llama_pooling_type(ctx))
        if reported not in POOLING_NAMES:
            raise HarnessError(
                f"llama.cpp runs {path.name} with pooling type {reported}, not a pooled embedding"
            )
        loaded = LlamaCppEmbeddingModel(
            lib=lib,
            model=model,
            ctx=ctx,
            path=path,
            device=device,
            settings=settings,
            context_length=context,
            metadata=metadata,
        )
    except BaseException:
        lib.llama_free(ctx)
        raise
    log.info(
        "loaded %s on %s in %.2fs as an embedding model: %d dimensions, %s pooling%s, "
        "context %d, %.1f MiB",
        path.name,
        device.key,
        time.monotonic() - started,
        loaded.dimensions,
        loaded.pooling,
        ", normalised" if loaded.normalize else "",
        context,
        loaded.memory_bytes() / MIB,
    )
    return loaded


def split_parameters(spans: list[Device], max_devices: int) -> tuple[int, list[float]]:
    """``main_gpu`` and ``tensor_split`` for a layer split over ``spans`` (CUDA devices, the
    primary first): an equal share of the layers (and their KV cache) on each assigned device,
    none on the others; the primary holds the small tensors and runs the final layers' output.
    """
    shares = [0.0] * max_devices
    for device in spans:
        if not 0 <= device.index < max_devices:
            raise HarnessError(f"{device.key} is beyond llama.cpp's {max_devices} devices")
        shares[device.index] = 1.0
    return spans[0].index, shares


def _check_fits(
    lib: Any,
    model: Any,
    metadata: dict[str, str],
    device: Device,
    cells: int,
    name: str,
    spans: list[Device] | None = None,
) -> None:
    """Refuse a KV cache that cannot fit the device at all, before llama.cpp allocates (and, on
    the CPU, zeroes) it. The neuron's placement check uses an estimate made before the file was
    downloaded; here the real layer and head counts are known."""
    from cortex_harness_llamacpp.model import kv_bytes_per_token

    kv = cells * kv_bytes_per_token(lib, model, metadata)
    weights = int(lib.llama_model_size(model))
    total = sum(d.total_memory for d in spans) if spans else device.total_memory
    where = "+".join(d.key for d in spans) if spans else device.key
    if weights + kv > total:
        raise DeviceOutOfMemory(
            f"{name} with a KV cache of {cells} tokens needs {(weights + kv) / MIB:.0f} MiB "
            f"({kv / MIB:.0f} MiB of KV cache), more than {where} has "
            f"({total / MIB:.0f} MiB); ask for a smaller context_length, "
            "kv_tokens or max_batch"
        )


def _load_failure(what: str) -> HarnessError:
    """A typed error for a NULL from llama.cpp, with the reason it logged: out of memory is
    :class:`DeviceOutOfMemory` (retryable elsewhere or after an eviction), anything else (a
    corrupt or unsupported file) a plain :class:`HarnessError`."""
    from cortex_harness_llamacpp import native

    problems = native.take_recent_problems()
    detail = f": {problems[-1]}" if problems else " (see the neuron log)"
    if native.looks_like_out_of_memory(problems):
        return DeviceOutOfMemory(f"{what}: out of memory{detail}")
    return HarnessError(f"{what}{detail}")


def resolve_context_length(trained: int, requested: int | None, settings: LlamaCppSettings) -> int:
    """The request's context length when it names one; else the GGUF's trained context, capped
    by ``max_context`` so a 128k-context file does not allocate a 128k KV cache by default."""
    if requested is not None:
        if requested < 16:
            raise HarnessError(f"context_length {requested} is too small (at least 16)")
        if trained and requested > trained:
            log.warning("context_length %d exceeds the trained context %d", requested, trained)
        return requested
    if trained <= 0:
        return settings.max_context
    return min(trained, settings.max_context)


def _context_params(
    lib: Any, device: Device, settings: LlamaCppSettings, cells: int, max_batch: int
) -> Any:
    """One unified KV cache of ``cells`` cells shared by up to ``2 x max_batch`` sequences: the
    running ones, and as many idle ones keeping a finished generation's prefix."""
    params = base_context_params(lib, device, settings)
    params.n_ctx = cells
    params.n_batch = min(settings.n_batch, cells)
    params.n_ubatch = params.n_batch
    params.n_seq_max = max(1, min(2 * max_batch, lib.llama_max_parallel_sequences()))
    params.kv_unified = True
    return params


def base_context_params(lib: Any, device: Device, settings: LlamaCppSettings) -> Any:
    """What every context of this harness shares (generation and embedding): threads, flash
    attention, and on the CPU nothing offloaded."""
    params = lib.llama_context_default_params()
    params.n_threads = settings.threads
    params.n_threads_batch = settings.threads_batch
    params.no_perf = True
    params.flash_attn_type = {
        "auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[settings.flash_attn]
    if device.kind == "cpu":
        # A CUDA build would otherwise move KV and big batches to a GPU the neuron did not pick.
        params.offload_kqv = False
        params.op_offload = False
    return params
