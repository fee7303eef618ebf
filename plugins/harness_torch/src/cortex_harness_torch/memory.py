"""How much device memory a transformers load needs, before anything is downloaded.

An estimate that is too low gets a model OOM-killed mid-load; one that is too high refuses loads
that would fit. So it follows what the harness really allocates: weights converted to the dtype
of the target device, the KV cache of its batching capacity (``kv_tokens``, see
:func:`cortex.harness.capacity_of`) plus the saved prefixes, and headroom for activations and
the allocator.
"""

from __future__ import annotations

from typing import Any

MIB = 2**20

_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


def target_dtype_bytes(device_kind: str) -> int:
    """float32 on CPU, bf16/fp16 elsewhere (see :func:`cortex_harness_torch.harness.dtype_for`)."""
    return 4 if device_kind == "cpu" else 2


def stored_dtype_bytes(config: dict[str, Any] | None) -> int:
    """Bytes per parameter in the safetensors files (config ``dtype``/``torch_dtype``; else 2)."""
    if not config:
        return 2
    name = config.get("dtype") or config.get("torch_dtype")
    return _DTYPE_BYTES.get(str(name), 2)


def kv_cache_bytes(config: dict[str, Any], tokens: int, dtype_bytes: int) -> int:
    """Keys and values for ``tokens`` positions in every layer."""
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim") or (int(config.get("hidden_size") or 0) // heads)
    return 2 * layers * kv_heads * int(head_dim) * tokens * dtype_bytes


def estimate_bytes(
    weight_file_bytes: int,
    config: dict[str, Any] | None,
    device_kind: str,
    context_length: int | None,
    max_batch: int | None = None,
    kv_tokens: int | None = None,
) -> int:
    """Weights at the target dtype, the KV cache of the load's capacity and of its saved
    prefixes, and headroom."""
    from cortex.harness import LoadOptions, capacity_of
    from cortex_harness_torch.prefix import prefix_cache_tokens

    target = target_dtype_bytes(device_kind)
    weights = weight_file_bytes * target // stored_dtype_bytes(config)
    kv = 0
    if config and kv_tokens != 0:  # kv_tokens 0: a model without a KV cache (embeddings)
        context = context_length or int(config.get("max_position_embeddings") or 2048)
        _, capacity = capacity_of(context, LoadOptions(max_batch=max_batch, kv_tokens=kv_tokens))
        positions = capacity + prefix_cache_tokens(context, capacity)
        kv = kv_cache_bytes(config, positions, target)
    headroom = weights // 10 + (64 * MIB if device_kind != "cpu" else 16 * MIB)
    return int(weights + kv + headroom)
