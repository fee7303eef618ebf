"""The models of this node: one entry per canonical id, with its lifecycle state.

States: ``loading`` -> ``ready`` -> ``unloading`` -> (gone); ``loading`` -> ``failed``; a model on
a poisoned device becomes ``failed``. The entry holds an opaque handle to the loaded model; only
the device worker ever calls it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import attrs

from cortex.harness import LoadedModel, LoadOptions, capabilities_of
from cortex.neuron.scheduler import ModelLoad
from cortex.neuron.workers import DeviceWorker

LOADING = "loading"
READY = "ready"
FAILED = "failed"
UNLOADING = "unloading"


@attrs.define
class ModelEntry:
    """One model on this node. ``reserved_bytes`` is what the memory ledger counts: the estimate
    while loading, the measured size once ready."""

    id: str
    harness: str
    device: str
    worker: DeviceWorker
    state: str = LOADING
    reserved_bytes: int = 0
    memory_bytes: int = 0
    load_seconds: float | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    in_flight: int = 0
    context_length: int | None = None
    # the load's max_batch (for a harness that does not batch itself, the scheduler's bound)
    max_batch: int | None = None
    # every device a multi-device load spans, ``device`` (the primary, whose worker runs it)
    # first; empty for a one-device model. The others are reserved for it while it is here.
    devices: tuple[str, ...] = ()
    error: dict[str, Any] | None = None
    handle: LoadedModel | None = attrs.field(default=None, repr=False)
    # what the plan gave the harness (set once a device was chosen)
    options: LoadOptions | None = attrs.field(default=None, repr=False)
    load_task: asyncio.Task[ModelEntry] | None = attrs.field(default=None, repr=False)
    idle: asyncio.Event = attrs.field(factory=asyncio.Event, repr=False)

    def __attrs_post_init__(self) -> None:
        self.idle.set()

    def begin_request(self) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.last_used = time.time()

    def end_request(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last_used = time.time()
        if self.in_flight == 0:
            self.idle.set()

    def fail(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.state = FAILED
        self.error = {"code": code, "message": message}
        if details:
            self.error["details"] = details

    @property
    def spans(self) -> tuple[str, ...]:
        """The devices this model holds memory on."""
        return self.devices or ((self.device,) if self.device else ())

    def share_on(self, device_key: str) -> int:
        """The bytes the ledger counts on one of its devices: an equal share of the total."""
        spans = self.spans
        return self.reserved_bytes // len(spans) if device_key in spans else 0

    def load(self) -> ModelLoad | None:
        """The model's share of its device's scheduler, once it is loaded."""
        if self.handle is None:
            return None
        return self.worker.scheduler.load_of(self.handle, self.max_batch)

    def to_json(self) -> dict[str, Any]:
        """The ``ModelEntry`` of the neuron HTTP API contract, with the model's share of its
        device's scheduler (``running``, ``waiting``, ``max_batch``, ``kv_tokens``,
        ``kv_tokens_reserved``) once it is ready."""
        load = self.load()
        return {
            "id": self.id,
            "harness": self.harness,
            "device": self.device,
            "devices": list(self.spans),
            "state": self.state,
            "memory_bytes": self.memory_bytes,
            "load_seconds": self.load_seconds,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "in_flight": self.in_flight,
            "context_length": self.context_length,
            # what requests it can serve beyond plain completions (cortex.harness names):
            # chat, tools, logprobs, structured_output
            "capabilities": sorted(capabilities_of(self.handle)),
            "error": self.error,
            **(load.to_json() if load is not None else ModelLoad().to_json()),
        }


class ModelTable:
    """Entries by canonical id. Lives on the event loop (no locks needed)."""

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    def get(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    def put(self, entry: ModelEntry) -> None:
        self._entries[entry.id] = entry

    def remove(self, model_id: str) -> None:
        self._entries.pop(model_id, None)

    def all(self) -> list[ModelEntry]:
        return sorted(self._entries.values(), key=lambda e: e.id)

    def on_device(self, device_key: str) -> list[ModelEntry]:
        """Models that run on the device (their primary is that device)."""
        return [e for e in self._entries.values() if e.device == device_key]

    def holding(self, device_key: str) -> list[ModelEntry]:
        """Models that hold memory on the device: those running there and multi-device
        models that span it."""
        return [e for e in self._entries.values() if device_key in e.spans]

    def reserved_by(self, device_key: str) -> ModelEntry | None:
        """The multi-device model this device is a secondary of (reserved for it), if any."""
        for entry in self._entries.values():
            if entry.state != FAILED and device_key in entry.devices[1:]:
                return entry
        return None

    def reserved_on(self, device_key: str) -> int:
        """Bytes held or being loaded on a device (failed entries hold nothing); a
        multi-device model counts its share on each device it spans."""
        return sum(e.share_on(device_key) for e in self.holding(device_key) if e.state != FAILED)
