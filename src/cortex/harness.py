"""The contract between the neuron and harness plugins.

A harness turns a fetched repo into a :class:`LoadedModel` on one device. Every method of a
loaded model and of a generation is called on that device's worker thread and nowhere else, so a
harness never needs locks and never sees two of its calls at once. Generation is step-sized: the
neuron asks for one token at a time, which is what lets two streams share a device and lets a
disconnected client stop its generation within one step.

Everything above a token id (detokenisation, stop strings, max_tokens, usage, finish reasons, the
OpenAI wire format) lives in the neuron, so a harness only does what is specific to its library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from cortex.devices import Device
from cortex.source import Preflight


@attrs.frozen
class LoadOptions:
    """What the load request and the model profile asked for. ``device_kind`` (``cpu``,
    ``cuda``) is the kind of device the load targets, so an estimate can account for the dtype
    the harness would use there (float32 on CPU, bf16 on CUDA)."""

    quant: str | None = None
    context_length: int | None = None
    device_kind: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class SamplingParams:
    """Sampling for one generation; ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@attrs.frozen
class Step:
    """One decode step: the token produced and whether it ends the generation (EOS)."""

    token_id: int
    is_eos: bool = False


class HarnessError(Exception):
    """A harness failure that is not a device fault (bad repo, unsupported model)."""


class PromptError(HarnessError):
    """The request cannot be turned into a prompt (e.g. the chat template refused the messages).
    The client's fault: the neuron answers 400, the model stays healthy."""


class DeviceOutOfMemory(HarnessError):
    """The device ran out of memory for this load or generation. Not a fault: the device is
    still usable, so the neuron answers 503 with Retry-After and does not poison the worker."""


class DeviceFault(Exception):
    """A failure that leaves the device in an unknown state (e.g. a CUDA error).

    Raising it poisons the device worker: later jobs fail fast instead of touching a broken
    context.
    """


@runtime_checkable
class Generation(Protocol):
    """One in-progress generation holding its own KV cache."""

    def step(self) -> Step:
        """Produce the next token (the first call runs the prefill)."""
        ...

    def close(self) -> None:
        """Release the KV cache of this generation; called once, also after a cancel."""
        ...


@runtime_checkable
class LoadedModel(Protocol):
    """A model resident on one device."""

    context_length: int

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Apply the model's chat template and tokenize; returns prompt token ids."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Tokenize raw text for ``/v1/completions``."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Detokenize; the neuron calls it on growing prefixes to stream text safely."""
        ...

    def start(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        """Begin a generation; no work needs to happen before the first ``step``."""
        ...

    def reset(self) -> None:
        """Drop any cached KV state shared between generations."""
        ...

    def memory_bytes(self) -> int:
        """Memory this model holds on its device now."""
        ...

    def unload(self) -> None:
        """Free everything (on CUDA, also the allocator's cache)."""
        ...


@runtime_checkable
class Harness(Protocol):
    """What ``cortex_register_harnesses`` registers."""

    name: str

    def accepts(self, preflight: Preflight) -> bool:
        """Whether this harness can load the repo preflight described (from its file list)."""
        ...

    def files_needed(self, preflight: Preflight) -> list[str]:
        """Which files a fetch must download for a load (config, tokenizer, weights)."""
        ...

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        """Bytes a load will need on the device, before anything is downloaded."""
        ...

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        """Load from a local snapshot directory onto ``device``; runs on its worker thread."""
        ...


def accepting_harnesses(harnesses: list[Harness], preflight: Preflight) -> list[Harness]:
    """The installed harnesses that can load the repo preflight described, in registration order."""
    return [h for h in harnesses if h.accepts(preflight)]


__all__ = [
    "DeviceFault",
    "DeviceOutOfMemory",
    "Generation",
    "Harness",
    "HarnessError",
    "LoadOptions",
    "LoadedModel",
    "PromptError",
    "SamplingParams",
    "Step",
    "accepting_harnesses",
]
