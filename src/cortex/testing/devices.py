"""A neuron with several CPU devices, in the test's process, for tests of multi-device planning,
placement and eviction without GPUs.

The devices are what a discovery plugin of a bigger machine would register (``cpu``,
``cpu:1``, ...: NUMA nodes or core groups), and :class:`SpanningEcho` is the echo harness
allowed to span devices (``max_devices``), recording the devices each load was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from cortex.builtins.echo import EchoHarness
from cortex.config import NeuronConfig, structure_config
from cortex.devices import Device
from cortex.harness import Harness, LoadedModel, LoadOptions
from cortex.neuron.daemon import make_app
from cortex.neuron.node import Node
from cortex.plugins import get_registry
from cortex.source_resolver import SourceResolver
from cortex.testing.servers import UvicornThread

MIB = 2**20


@attrs.frozen
class SpanningEcho(EchoHarness):
    """The echo harness, allowed to span up to four devices, estimating ``estimate_mb``."""

    name: str = "echo"
    max_devices: int = 4
    estimate_mb: int = 300
    loads: list[tuple[str, tuple[str, ...]]] = attrs.field(factory=list, eq=False)

    def estimate_memory(self, preflight: Any, options: LoadOptions) -> int:
        return self.estimate_mb * MIB

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        self.loads.append((device.key, tuple(d.key for d in options.devices)))
        return super().load(snapshot, device, options)


@attrs.define
class MultiDeviceNeuron:
    node: Node
    server: UvicornThread

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()
        self.node.workers.stop()


def start_multi_device_neuron(
    registry_url: str,
    cache: Path,
    budgets_mb: dict[str, int],
    harnesses: list[Harness],
    name: str = "multi",
) -> MultiDeviceNeuron:
    """A neuron on loopback whose devices are ``cpu``, ``cpu:1``, ... with these budgets."""
    config = structure_config(
        {
            "name": name,
            "sources": {
                "huggingface": {
                    "endpoint": registry_url,
                    "auth_env": "CORTEX_TEST_NO_TOKEN",
                    "cache_dir": str(cache),
                }
            },
            "devices": {key: {"memory_mb": mb} for key, mb in budgets_mb.items()},
        },
        NeuronConfig,
        "test neuron.toml",
    )
    resolver = SourceResolver.from_config(config, get_registry().source_plugins())
    devices = [
        Device("cpu", int(key.partition(":")[2] or 0), key, 64 * 2**30, 64 * 2**30)
        for key in budgets_mb
    ]
    node = Node.build(config, harnesses, devices, resolver)
    server = UvicornThread(make_app(node, drain_seconds=1)).start()
    return MultiDeviceNeuron(node, server)


__all__ = ["MultiDeviceNeuron", "SpanningEcho", "start_multi_device_neuron"]
