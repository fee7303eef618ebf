"""The transformers harness (load and generation arrive with the neuron issue)."""

from __future__ import annotations

from pathlib import Path

import attrs

from cortex.devices import Device
from cortex.harness import HarnessError, LoadedModel, LoadOptions
from cortex.source import Preflight, WeightFormat


@attrs.frozen
class TorchHarness:
    name: str = "torch"

    def accepts(self, preflight: Preflight) -> bool:
        return "config.json" in preflight.file_names() and preflight.weight_format in (
            WeightFormat.SAFETENSORS,
            WeightFormat.SAFETENSORS_SHARDED,
            WeightFormat.BOTH,
        )

    def files_needed(self, preflight: Preflight) -> list[str]:
        return [
            f
            for f in preflight.file_names()
            if f.endswith((".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken"))
            and "/" not in f
        ]

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        weights = sum(
            preflight.size_of(f) for f in preflight.file_names() if f.endswith(".safetensors")
        )
        return int(weights * 1.2) + 64 * 2**20

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        raise HarnessError("the torch harness cannot load models yet")
