"""A GGUF model over several GPUs (llama.cpp's layer split): the parameters, the refusal of a
CPU span, and, on a machine with two CUDA devices, a real split that matches one device."""

from __future__ import annotations

from pathlib import Path

import pytest
from cortex_harness_llamacpp.harness import LlamaCppHarness, split_parameters

from cortex.devices import Device, cpu_device
from cortex.harness import HarnessError, LoadOptions, SamplingParams

pytest.importorskip("llama_cpp")


def gpu(index: int) -> Device:
    return Device("cuda", index, f"gpu{index}", 24 * 2**30, 24 * 2**30)


def test_split_parameters_give_each_assigned_gpu_an_equal_share() -> None:
    main, shares = split_parameters([gpu(2), gpu(0)], 4)
    assert main == 2
    assert shares == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(HarnessError, match="beyond"):
        split_parameters([gpu(0), gpu(5)], 4)


def test_a_cpu_span_is_refused(tiny_gguf_repo: Path) -> None:
    cpu, cpu1 = cpu_device(), Device("cpu", 1, "cpu1", 2**30, 2**30)
    options = LoadOptions(quant="F16", devices=(cpu, cpu1))
    with pytest.raises(HarnessError, match="CUDA devices only"):
        LlamaCppHarness().load(tiny_gguf_repo, cpu, options)


def cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(cuda_count() < 2, reason="needs two CUDA devices")
def test_a_split_over_two_gpus_matches_one_gpu(tiny_gguf_repo: Path) -> None:
    from cortex.devices import cuda_devices

    devices = cuda_devices()[:2]
    harness = LlamaCppHarness()
    greedy = SamplingParams(temperature=0)

    def run(options: LoadOptions) -> list[int]:
        model = harness.load(tiny_gguf_repo, devices[0], options)
        try:
            generation = model.start(model.tokenize("the quick cat"), greedy)
            return [generation.step().token_id for _ in range(12)]
        finally:
            model.unload()

    alone = run(LoadOptions(quant="F32", extra={"flash_attn": "off"}))
    split = run(LoadOptions(quant="F32", extra={"flash_attn": "off"}, devices=tuple(devices)))
    assert split == alone
