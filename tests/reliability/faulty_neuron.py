"""``neuron run`` with one extra, simulated accelerator whose worker faults on demand.

Used by test_device_fault.py as a real process (its exit status is the point): the node is built
as ``neuron run`` builds it, plus a ``sim:0`` device; when the file named by
``CORTEX_TEST_FAULT_TRIGGER`` appears, a job on ``sim:0`` raises DeviceFault (what a CUDA
"illegal memory access" raises in a harness), which poisons that worker.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

from cortex.cli.common import configure_logging
from cortex.config import load_neuron_config
from cortex.devices import Device
from cortex.harness import DeviceFault
from cortex.neuron import daemon
from cortex.neuron.node import Node
from cortex.plugins import get_registry
from cortex.source_resolver import SourceResolver


def _fault() -> None:
    raise DeviceFault("CUDA error: an illegal memory access was encountered (simulated)")


def build_node(config):  # the daemon's build_node, plus sim:0 and the trigger
    registry = get_registry()
    devices = [*registry.devices(), Device("sim", 0, "simulated accelerator", 2**30, 2**30)]
    resolver = SourceResolver.from_config(config, registry.source_plugins())
    node = Node.build(config, registry.harnesses(), devices, resolver)
    trigger = os.environ["CORTEX_TEST_FAULT_TRIGGER"]

    def fault_when_triggered() -> None:
        while not os.path.exists(trigger):
            time.sleep(0.02)
        worker = node.workers.get("sim:0")
        assert worker is not None and node.loop is not None
        asyncio.run_coroutine_threadsafe(worker.run(_fault, internal=True), node.loop)

    threading.Thread(target=fault_when_triggered, daemon=True).start()
    return node


def main() -> int:
    config_path, listen, drain = sys.argv[1], sys.argv[2], float(sys.argv[3])
    configure_logging("warning", "text")
    daemon.build_node = build_node
    return daemon.serve(load_neuron_config(config_path), listen, drain)


if __name__ == "__main__":
    sys.exit(main())
