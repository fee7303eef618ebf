"""How much device memory a transformers load needs, before anything is downloaded.

An estimate that is too low gets a model OOM-killed mid-load; one that is too high refuses loads
that would fit. So it follows what the harness really allocates: weights converted to the dtype
of the target device, one sequence's KV cache, and headroom for activations and the allocator.
"""

from __future__ import annotations

from typing import Any

MIB = 2**20

_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}

KV_RESERVE_TOKENS = 8192
"""The KV cache is reserved for one sequence of at most this many tokens: enough for typical
requests, without refusing a 128k-context model for a context nobody uses at once."""


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
) -> int:
    target = target_dtype_bytes(device_kind)
    weights = weight_file_bytes * target // stored_dtype_bytes(config)
    kv = 0
    if config:
        context = context_length or int(config.get("max_position_embeddings") or 2048)
        kv = kv_cache_bytes(config, min(context, KV_RESERVE_TOKENS), target)
    headroom = weights // 10 + (64 * MIB if device_kind != "cpu" else 16 * MIB)
    return int(weights + kv + headroom)
