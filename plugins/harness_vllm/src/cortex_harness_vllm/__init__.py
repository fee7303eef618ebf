"""cortex-harness-vllm: safetensors models through vLLM's engine, behind the batched contract.

vllm is imported inside the harness's methods, never here: a gateway with this plugin installed
never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable

from cortex.harness import Harness
from cortex.hookspecs import hookimpl
from cortex_harness_vllm.harness import VllmHarness


@hookimpl
def cortex_register_harnesses(register: Callable[[Harness], None]) -> None:
    register(VllmHarness())
