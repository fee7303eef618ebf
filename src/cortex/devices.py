"""Devices a neuron can place models on, and how they are discovered.

Discovery is a hook (``cortex_discover_devices``) so another accelerator can plug in later; core
registers the CPU device (always present) and CUDA devices found through nvidia-ml-py or torch,
whichever is importable. No GPU is a normal, supported situation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import attrs

log = logging.getLogger(__name__)


@attrs.define
class Device:
    """One place to run models. ``key`` (``cpu``, ``cuda:0``) is what load requests name;
    ``worker_name`` (``cpu``, ``cuda-dev-0``) is the name of the thread that owns it."""

    kind: str
    index: int
    name: str
    total_memory: int
    free_memory: int
    compute_capability: str | None = None

    @property
    def key(self) -> str:
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{self.index}"

    @property
    def worker_name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"{self.kind}-dev-{self.index}"


RegisterDevice = Callable[[Device], None]


def _system_memory() -> tuple[int, int]:
    """Total and available system memory in bytes (Linux /proc/meminfo, else a sysconf guess)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return pages * size, pages * size


def cpu_device(memory_budget: int | None = None) -> Device:
    """The CPU device; its memory is the configured budget when one is set, else system memory."""
    total, available = _system_memory()
    if memory_budget is not None:
        return Device("cpu", 0, "cpu", memory_budget, min(memory_budget, available))
    return Device("cpu", 0, "cpu", total, available)


def cuda_devices() -> list[Device]:
    """CUDA devices via nvidia-ml-py (no CUDA context needed), else torch, else none.

    ``CUDA_VISIBLE_DEVICES=""`` hides every GPU: then nothing is probed (and torch, slow to
    import, is not imported just to find none)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return []
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            devices = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                devices.append(
                    Device(
                        "cuda",
                        i,
                        name.decode() if isinstance(name, bytes) else str(name),
                        int(mem.total),
                        int(mem.free),
                        f"{major}.{minor}",
                    )
                )
            return devices
        except Exception as exc:  # NVML missing driver etc.: fall back to torch
            log.debug("nvml discovery failed: %s", exc)
    try:
        import torch
    except ImportError:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        devices.append(
            Device("cuda", i, props.name, int(total), int(free), f"{props.major}.{props.minor}")
        )
    return devices
