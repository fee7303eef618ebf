"""Fixtures of the vLLM harness's tests: a tiny model vLLM's CPU attention can run (head size
32: it supports no smaller), and the engine in the test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# the engine core in this process (spawned engine processes need a __main__ guard)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

VLLM_SHAPE = {"num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="session")
def tiny_vllm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of ``tiny_llama_dir`` (tokenizer, template, seed) with a head size of 32."""
    from cortex.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "llama", shape=VLLM_SHAPE)
