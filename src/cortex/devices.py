"""Devices a neuron can place models on, and how they are discovered.

Discovery is a hook (``cortex_discover_devices``) so another accelerator can plug in later; core
registers the CPU device (always present) and CUDA devices found through NVML (nvidia-ml-py, a
dependency) or, failing that, torch. No GPU is a normal, supported situation.
"""

from __future__ import annotations

import contextlib
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
        """``cpu`` for the CPU; ``cpu:N`` for a further CPU device (N > 0: a NUMA node or a
        share of the cores a discovery plugin registers, e.g. for CPU tensor parallel)."""
        if self.kind == "cpu" and self.index == 0:
            return "cpu"
        return f"{self.kind}:{self.index}"

    @property
    def worker_name(self) -> str:
        if self.kind == "cpu" and self.index == 0:
            return "cpu"
        return f"{self.kind}-dev-{self.index}"


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


# Present when the NVIDIA kernel driver is loaded: a GPU machine, whatever Python can import.
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"
_warned_undiscovered = False


def visible_cuda_indices(count: int, uuids: list[str]) -> list[int] | None:
    """The physical (NVML, PCI bus order) index of each CUDA device this process may use, in
    CUDA's order, from ``CUDA_VISIBLE_DEVICES``; None when it is unset (all of them).

    Entries are indices or (prefixes of) ``GPU-...`` UUIDs, as CUDA reads them; as in CUDA, an
    entry that names no device ends the list."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    visible: list[int] = []
    for entry in (e.strip() for e in raw.split(",")):
        if entry.isdigit() and int(entry) < count:
            index = int(entry)
        else:
            matches = [i for i, uuid in enumerate(uuids) if entry and uuid.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        if index in visible:
            break
        visible.append(index)
    return visible


def _nvml_devices() -> list[Device] | None:
    """CUDA devices through NVML (nvidia-ml-py, a dependency of cortex): no CUDA context, no
    torch. None when NVML cannot be used (no driver library): the caller falls back."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no libnvidia-ml (no driver): not a GPU machine, or a broken one
        log.debug("NVML is not usable: %s", exc)
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        order = visible_cuda_indices(count, uuids)
        devices = []
        for cuda_index, physical in enumerate(range(count) if order is None else order):
            handle = handles[physical]
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(
                Device(
                    "cuda",
                    cuda_index,
                    _text(pynvml.nvmlDeviceGetName(handle)),
                    int(mem.total),
                    int(mem.free),
                    f"{major}.{minor}",
                )
            )
        return devices
    except Exception as exc:
        log.warning("NVML device query failed: %s", exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_devices() -> list[Device]:
    """CUDA devices through torch, when it is installed (a fallback: it creates a context)."""
    try:
        import torch
    except ImportError:
        return []
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


def cuda_devices() -> list[Device]:
    """CUDA devices via NVML (nvidia-ml-py: no CUDA context, no torch), else torch, else none.

    Why NVML first: a GGUF-only GPU node has llama.cpp but no torch, and discovery through
    torch found no GPU there, so llama.cpp ran on the CPU without a word. NVML comes with the
    driver and nvidia-ml-py is a dependency of cortex, so every node can see its GPUs.

    The indices are CUDA's, which torch and llama.cpp use: ``CUDA_VISIBLE_DEVICES`` is applied
    (indices or UUIDs), and ``CUDA_DEVICE_ORDER`` is set to ``PCI_BUS_ID`` when unset (the
    process's CUDA libraries then number devices in NVML's order; CUDA's own default puts the
    fastest first, which on a box with two different GPUs is another order).
    ``CUDA_VISIBLE_DEVICES=""`` hides every GPU: then nothing is probed. A machine whose NVIDIA
    driver is loaded but where no device was found gets a warning, not silence."""
    global _warned_undiscovered
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return []
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    devices = _nvml_devices()
    if devices is None:
        devices = _torch_devices()
    if not devices and os.path.exists(NVIDIA_DRIVER_FILE) and not _warned_undiscovered:
        _warned_undiscovered = True
        log.warning(
            "the NVIDIA driver is loaded but no CUDA device was found (NVML failed and torch "
            "is missing or sees none): models will run on the CPU. Check that nvidia-ml-py is "
            "installed and libnvidia-ml.so loads, and CUDA_VISIBLE_DEVICES."
        )
    return devices
