"""cortex-harness-llamacpp: GGUF models through llama-cpp-python, CPU and CUDA offload.

llama_cpp is imported inside the harness's methods, never here.
"""

from __future__ import annotations

from collections.abc import Callable

from cortex.harness import Harness
from cortex.hookspecs import hookimpl
from cortex_harness_llamacpp.harness import LlamaCppHarness


@hookimpl
def cortex_register_harnesses(register: Callable[[Harness], None]) -> None:
    register(LlamaCppHarness())
