"""The neuron on a CUDA machine (skipped without a visible GPU)."""

from __future__ import annotations

import pytest

from tests.neuron.conftest import LiveNeuron

pytestmark = pytest.mark.gpu


def test_models_go_to_the_gpu_and_unloading_returns_its_memory(neuron: LiveNeuron) -> None:
    import torch

    with neuron.http() as client:
        info = client.get("/discovery").json()
    gpu = next(d for d in info["devices"] if d["kind"] == "cuda")
    assert gpu["key"] == "cuda:0" and gpu["worker"] == "cuda-dev-0"
    assert gpu["compute_capability"] and gpu["total_memory"] > 0
    assert info["cuda_version"]
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(0)
    for _ in range(2):
        model = neuron.load("acme/tiny-llama")
        assert model["device"] == "cuda:0"
        reply = neuron.openai().chat.completions.create(
            model="acme/tiny-llama",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=16,
            temperature=0,
        )
        assert reply.usage.completion_tokens >= 1
        with neuron.http() as client:
            assert client.post("/models/unload", json={"model_id": "acme/tiny-llama"}).is_success
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(0) == baseline
