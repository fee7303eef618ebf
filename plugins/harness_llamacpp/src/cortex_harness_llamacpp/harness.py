"""The llama.cpp harness (load and generation arrive with the GGUF issue)."""

from __future__ import annotations

from pathlib import Path

import attrs

from cortex.devices import Device
from cortex.harness import HarnessError, LoadedModel, LoadOptions
from cortex.source import Preflight, WeightFormat


@attrs.frozen
class LlamaCppHarness:
    name: str = "llamacpp"

    def accepts(self, preflight: Preflight) -> bool:
        return preflight.weight_format in (WeightFormat.GGUF, WeightFormat.BOTH)

    def files_needed(self, preflight: Preflight) -> list[str]:
        return [preflight.gguf_file] if preflight.gguf_file else []

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        size = preflight.size_of(preflight.gguf_file) if preflight.gguf_file else 0
        return int(size * 1.1) + 32 * 2**20

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        raise HarnessError("the llama.cpp harness cannot load models yet")
