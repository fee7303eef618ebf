"""cortex-harness-torch: transformers models from safetensors repos, on CPU and CUDA.

torch and transformers are imported inside the harness's methods, never here, so that a gateway
with this plugin installed does not pay for them.
"""

from __future__ import annotations

from collections.abc import Callable

from cortex.harness import Harness
from cortex.hookspecs import hookimpl
from cortex_harness_torch.harness import TorchHarness


@hookimpl
def cortex_register_harnesses(register: Callable[[Harness], None]) -> None:
    register(TorchHarness())
