"""vLLM on CUDA (``gpu``-marked: run where a GPU and a CUDA build of vLLM are installed):
a load on one chosen device, and tensor parallel over two, each matching vLLM's own greedy
output. The CPU tests cover the mapping; these check the device placement the CPU cannot
(``CUDA_VISIBLE_DEVICES`` for vLLM's worker processes, ``gpu_memory_utilization`` from the
plan)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cortex_harness_vllm.harness import VllmHarness

from cortex.devices import cuda_devices
from cortex.harness import LoadOptions, SamplingParams
from cortex.neuron.scheduler import Scheduler
from cortex.testing.batching import collected, drive, sequence

pytestmark = pytest.mark.gpu

PROMPT = [5, 6, 7, 8, 9, 10]


def greedy_tokens(model, n: int = 16) -> list[int]:  # type: ignore[no-untyped-def]
    seq = sequence(model, PROMPT, n, SamplingParams(temperature=0))
    drive(Scheduler(), {0: [seq]})
    return collected(seq).tokens


def reference(model_dir: Path, n: int = 16) -> list[int]:
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams

    llm = LLM(model=str(model_dir), max_model_len=256, gpu_memory_utilization=0.2)
    try:
        params = VllmSamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        output = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0]
        return list(output.outputs[0].token_ids)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_a_load_on_the_last_gpu_matches_vllm(tiny_vllm_dir: Path) -> None:
    device = cuda_devices()[-1]
    model = VllmHarness().load(tiny_vllm_dir, device, LoadOptions(max_batch=4))
    try:
        assert model.device_keys == (device.key,)
        got = greedy_tokens(model)
    finally:
        model.unload()
    assert got == reference(tiny_vllm_dir)[: len(got)]


@pytest.mark.skipif(len(cuda_devices()) < 2, reason="needs two CUDA devices")
def test_tensor_parallel_over_two_gpus_matches_one(tiny_vllm_dir: Path) -> None:
    devices = tuple(cuda_devices()[:2])
    model = VllmHarness().load(tiny_vllm_dir, devices[0], LoadOptions(max_batch=4, devices=devices))
    try:
        assert model.device_keys == tuple(d.key for d in devices)
        got = greedy_tokens(model)
    finally:
        model.unload()
    assert got == reference(tiny_vllm_dir)[: len(got)]
