"""``GET /discovery``: what this node is and can do.

Host, OS, driver and CUDA versions (when a GPU stack is present), each device with its memory
budget and free memory, the installed harnesses and the configured sources (scheme, endpoint,
whether a token is configured; never the token). No GPU is a normal, supported answer.
"""

from __future__ import annotations

import functools
import logging
import platform
import socket
import sys
from typing import Any

from cortex import __version__
from cortex.neuron.node import Node

log = logging.getLogger(__name__)


@functools.cache
def gpu_stack_versions() -> tuple[str | None, str | None]:
    """(driver version, CUDA version) via nvidia-ml-py, else torch if already imported."""
    driver: str | None = None
    cuda: str | None = None
    try:
        import pynvml

        pynvml.nvmlInit()
        raw = pynvml.nvmlSystemGetDriverVersion()
        driver = raw.decode() if isinstance(raw, bytes) else str(raw)
        version = int(pynvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{version // 1000}.{(version % 1000) // 10}"
    except Exception as exc:  # not installed, no driver: both are normal
        log.debug("nvml unavailable: %s", exc)
    torch = sys.modules.get("torch")
    if cuda is None and torch is not None and getattr(torch.version, "cuda", None):
        try:
            if torch.cuda.is_available():
                cuda = str(torch.version.cuda)
        except Exception:
            pass
    return driver, cuda


def _plugin_of(obj: Any) -> str:
    module = type(obj).__module__
    return module.split(".")[0] if not module.startswith("cortex.") else module


def discovery_json(node: Node) -> dict[str, Any]:
    driver, cuda = gpu_stack_versions()
    return {
        "node": node.name,
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "driver_version": driver,
        "cuda_version": cuda,
        "version": __version__,
        "default_source": node.resolver.default_source,
        "devices": [node.device_json(key) for key in node.devices],
        "harnesses": [
            {"name": name, "plugin": _plugin_of(harness)}
            for name, harness in sorted(node.harnesses.items())
        ],
        "sources": [
            {
                "scheme": s["scheme"],
                "plugin": s["plugin"],
                "endpoint": s["endpoint"],
                "has_token": s["has_token"],
                "installed": s["installed"],
                "default": s["default"],
            }
            for s in node.resolver.describe()
        ],
    }
