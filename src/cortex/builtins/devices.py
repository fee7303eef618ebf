"""CPU and CUDA device discovery."""

from __future__ import annotations

from cortex.devices import RegisterDevice, cpu_device, cuda_devices
from cortex.hookspecs import hookimpl


@hookimpl
def cortex_discover_devices(register: RegisterDevice) -> None:
    for device in cuda_devices():
        register(device)
    register(cpu_device())
