"""The plan of a vLLM load before the engine starts: settings, the memory estimate (per rank
under tensor parallel) and the CPU core binding."""

from __future__ import annotations

import os

import pytest
from cortex_harness_vllm import memory
from cortex_harness_vllm.harness import cpu_binding
from cortex_harness_vllm.settings import resolve_settings

from cortex.devices import Device
from cortex.harness import HarnessError, LoadOptions

CONFIG = {
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 256,
    "max_position_embeddings": 4096,
    "dtype": "float32",
}


def test_settings_come_from_extra_then_the_environment_then_defaults() -> None:
    settings = resolve_settings(LoadOptions(extra={"dtype": "bfloat16", "other": 1}), {})
    assert settings.dtype_for("cpu") == "bfloat16"
    defaults = resolve_settings(LoadOptions(), {"CORTEX_VLLM_ENFORCE_EAGER": "false"})
    assert defaults.dtype_for("cpu") == "float32" and defaults.dtype_for("cuda") == "auto"
    assert defaults.eager_for("cpu") is False
    assert resolve_settings(LoadOptions(), {}).eager_for("cpu") is True
    with pytest.raises(HarnessError, match="dtype"):
        resolve_settings(LoadOptions(extra={"dtype": "int3"}), {})
    with pytest.raises(HarnessError, match="max_num_batched_tokens"):
        resolve_settings(LoadOptions(extra={"max_num_batched_tokens": "lots"}), {})


def test_the_kv_cache_is_the_capacity_plus_a_block_per_sequence() -> None:
    per_token = memory.kv_bytes_per_token(CONFIG, 4)
    assert per_token == 2 * 4 * 2 * 64 * 4
    options = LoadOptions(max_batch=8, kv_tokens=1000)
    # 1000 positions in blocks of 128 (8 blocks) and one spare block for each of 8 sequences
    assert memory.kv_cache_bytes(CONFIG, 4, 512, options, "cpu") == 16 * 128 * per_token
    # and never less than one context (4096 positions: 32 blocks)
    assert memory.kv_cache_bytes(CONFIG, 4, 4096, options, "cpu") == 40 * 128 * per_token


def test_tensor_parallel_splits_kv_heads_and_counts_each_ranks_overhead() -> None:
    gpus = tuple(Device("cuda", i, "gpu", 2**34, 2**34) for i in range(4))
    one = LoadOptions(max_batch=8, kv_tokens=4096)
    two = LoadOptions(max_batch=8, kv_tokens=4096, devices=gpus[:2])
    four = LoadOptions(max_batch=8, kv_tokens=4096, devices=gpus)
    per_rank_one = memory.kv_cache_bytes(CONFIG, 2, 4096, one, "cuda")
    assert memory.kv_cache_bytes(CONFIG, 2, 4096, two, "cuda") == per_rank_one // 2
    # 2 KV heads over 4 ranks: vLLM replicates, one head each (the same as two ranks)
    assert memory.kv_cache_bytes(CONFIG, 2, 4096, four, "cuda") == per_rank_one // 2
    weights = 100 * 2**20
    total_one = memory.estimate_bytes(weights, CONFIG, "auto", 4096, one, "cuda")
    total_two = memory.estimate_bytes(weights, CONFIG, "auto", 4096, two, "cuda")
    assert total_two - total_one == memory.OVERHEAD["cuda"][0]  # the second rank's own


def test_cpu_binding_leaves_the_event_loop_a_core_when_it_can() -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    assert cpu_binding(1, spare=1) == ",".join(str(c) for c in cores[:-1])
    assert cpu_binding(len(cores), spare=1).count("|") == len(cores) - 1  # no core to spare
    with pytest.raises(HarnessError, match="needs"):
        cpu_binding(len(cores) + 1)
