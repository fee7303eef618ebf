"""CUDA discovery without torch (issue 22): NVML (nvidia-ml-py, a dependency) finds the GPUs of a
GGUF-only node, with CUDA's numbering (CUDA_VISIBLE_DEVICES by index or UUID, PCI bus order),
and a machine with an NVIDIA driver where nothing was found says so.

NVML itself needs a GPU; here a stand-in module with NVML's API plays the driver (the real
thing runs in tests/neuron/test_gpu.py on a GPU machine)."""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

import pytest

from cortex import devices as devices_module
from cortex.devices import cuda_devices, visible_cuda_indices

GPUS = [  # (name, uuid, total, free, capability), in PCI bus order
    ("NVIDIA GeForce RTX 4090", "GPU-aaaa1111-0000", 24 * 2**30, 20 * 2**30, (8, 9)),
    ("NVIDIA RTX A4000", "GPU-bbbb2222-0000", 16 * 2**30, 15 * 2**30, (8, 6)),
]


def fake_nvml(gpus: list[tuple], fail_init: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = init
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetCount = lambda: len(gpus)
    module.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    module.nvmlDeviceGetUUID = lambda h: h[1].encode()
    module.nvmlDeviceGetName = lambda h: h[0]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h[2], free=h[3])
    module.nvmlDeviceGetCudaComputeCapability = lambda h: h[4]
    return module


class NoTorch(types.ModuleType):
    """Stands in for torch: discovery must not touch it when NVML answers."""

    def __getattr__(self, name: str):
        raise AssertionError(f"torch.{name} used for discovery")


@pytest.fixture
def gpu_machine(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS))
    monkeypatch.setitem(sys.modules, "torch", NoTorch("torch"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    return monkeypatch


def test_nvml_finds_every_gpu_without_torch(gpu_machine) -> None:
    found = cuda_devices()
    assert [(d.key, d.name, d.total_memory, d.compute_capability) for d in found] == [
        ("cuda:0", "NVIDIA GeForce RTX 4090", 24 * 2**30, "8.9"),
        ("cuda:1", "NVIDIA RTX A4000", 16 * 2**30, "8.6"),
    ]
    assert found[1].free_memory == 15 * 2**30
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # CUDA numbers them the same way


@pytest.mark.parametrize(
    ("visible", "names"),
    [
        ("1", ["NVIDIA RTX A4000"]),
        ("1,0", ["NVIDIA RTX A4000", "NVIDIA GeForce RTX 4090"]),
        ("GPU-bbbb", ["NVIDIA RTX A4000"]),
        ("0,7,1", ["NVIDIA GeForce RTX 4090"]),  # CUDA stops at the first invalid entry
        ("GPU-", []),  # ambiguous prefix: invalid
    ],
)
def test_cuda_visible_devices_gives_cuda_numbering(gpu_machine, visible: str, names) -> None:
    gpu_machine.setenv("CUDA_VISIBLE_DEVICES", visible)
    found = cuda_devices()
    assert [d.name for d in found] == names
    assert [d.index for d in found] == list(range(len(names)))


def test_an_empty_cuda_visible_devices_hides_every_gpu(gpu_machine) -> None:
    gpu_machine.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_devices() == []


def test_visible_indices_parsing() -> None:
    uuids = ["GPU-1", "GPU-2"]
    saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        assert visible_cuda_indices(2, uuids) is None
        os.environ["CUDA_VISIBLE_DEVICES"] = "1, 1"
        assert visible_cuda_indices(2, uuids) == [1]
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        if saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def test_a_driver_without_discoverable_gpus_is_not_silent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS, fail_init=True))
    monkeypatch.setitem(sys.modules, "torch", None)  # not installed (a GGUF-only node)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    driver = tmp_path / "version"
    driver.write_text("NVRM version: 550.54\n")
    monkeypatch.setattr(devices_module, "NVIDIA_DRIVER_FILE", str(driver))
    monkeypatch.setattr(devices_module, "_warned_undiscovered", False)
    with caplog.at_level(logging.WARNING, logger="cortex.devices"):
        assert cuda_devices() == []
    assert "NVIDIA driver is loaded but no CUDA device was found" in caplog.text
