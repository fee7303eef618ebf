"""The torch harness on CUDA (skipped without a visible GPU), plus the error mapping that
decides between "poison the device" and "try again later" (runs everywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cortex_harness_torch.harness import TorchHarness
from cortex_harness_torch.model import classify_torch_error

from cortex.harness import DeviceFault, DeviceOutOfMemory, LoadOptions, SamplingParams


def test_cuda_errors_poison_and_out_of_memory_does_not() -> None:
    import torch

    fault = classify_torch_error(RuntimeError("CUDA error: an illegal memory access"))
    assert isinstance(fault, DeviceFault)
    oom = classify_torch_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 2 GiB"))
    assert isinstance(oom, DeviceOutOfMemory)
    plain = ValueError("shape mismatch")
    assert classify_torch_error(plain) is plain


def _cuda_device():  # type: ignore[no-untyped-def]
    from cortex.devices import cuda_devices

    return cuda_devices()[0]


@pytest.mark.gpu
def test_cuda_load_uses_half_precision_and_matches_generate(tiny_llama_dir: Path) -> None:
    import torch

    model = TorchHarness().load(tiny_llama_dir, _cuda_device(), LoadOptions())
    try:
        assert next(model.model.parameters()).device.type == "cuda"
        assert next(model.model.parameters()).dtype in (torch.bfloat16, torch.float16)
        prompt = model.render_chat([{"role": "user", "content": "the river and the bridge"}])
        generation = model.start(prompt, SamplingParams(temperature=0))
        ours = [generation.step().token_id for _ in range(32)]
        generation.close()
        ids = torch.tensor([prompt], device=model.torch_device)
        reference = model.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
        )[0, len(prompt) :].tolist()
        assert ours == reference
        seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
        first = model.start(prompt, seeded)
        second = model.start(prompt, seeded)
        assert [first.step().token_id for _ in range(8)] == [
            second.step().token_id for _ in range(8)
        ]
    finally:
        model.unload()


@pytest.mark.gpu
def test_cuda_load_unload_cycles_return_the_memory(tiny_llama_dir: Path) -> None:
    import torch

    device = _cuda_device()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device.index)
    for _ in range(3):
        model = TorchHarness().load(tiny_llama_dir, device, LoadOptions())
        assert torch.cuda.memory_allocated(device.index) > baseline
        generation = model.start(model.tokenize("the cat"), SamplingParams(temperature=0))
        for _ in range(8):
            generation.step()
        generation.close()
        model.unload()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(device.index) == baseline
    assert torch.cuda.memory_reserved(device.index) <= 64 * 2**20


@pytest.mark.gpu
def test_cuda_batched_streams_match_generate_alone(tiny_llama_dir: Path) -> None:
    """The continuous-batching path on CUDA (bf16): eight prompts joining and leaving at
    different iterations, prompts chunked beside running decodes, each equal to generate()
    alone token for token."""
    import torch

    from cortex.neuron.scheduler import Scheduler
    from cortex.testing.batching import TEXTS, collected, drive, sequence

    model = TorchHarness().load(tiny_llama_dir, _cuda_device(), LoadOptions(max_batch=6))
    try:
        greedy = SamplingParams(temperature=0)
        prompts = [model.render_chat([{"role": "user", "content": t}]) for t in TEXTS]
        seqs = [sequence(model, p, 32, greedy) for p in prompts]
        drive(
            Scheduler(max_batch_tokens=24), {0: seqs[:3], 2: seqs[3:5], 5: seqs[5:7], 9: seqs[7:]}
        )
        for seq, prompt in zip(seqs, prompts, strict=True):
            ids = torch.tensor([prompt], device=model.torch_device)
            reference = model.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
            )[0, len(prompt) :].tolist()
            tokens = collected(seq).tokens
            assert tokens == reference[: len(tokens)]
    finally:
        model.unload()
