"""What the gateway knows about one neuron, parsed from the neuron HTTP API.

Parsing is lenient about extra fields (a newer neuron may add some) and strict about the ones
routing depends on: a malformed answer counts as a failed poll, never as a half-understood node.
"""

from __future__ import annotations

from typing import Any

import attrs

READY = "ready"
LOADING = "loading"
FAILED = "failed"
UNLOADING = "unloading"


class NodeAnswerError(ValueError):
    """A neuron answered something that does not follow the neuron HTTP API."""


def _int(data: dict[str, Any], key: str, default: int | None = None) -> int:
    value = data.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        if default is not None:
            return default
        raise NodeAnswerError(f"{key!r} must be a number, got {value!r}")
    return int(value)


def _float(data: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = data.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


@attrs.frozen
class NodeDevice:
    """One device of a neuron, from ``GET /discovery``."""

    key: str
    kind: str
    total_memory: int
    free_memory: int
    state: str = "ok"
    # the multi-device model this device is a secondary of (nothing else is placed here)
    reserved_by: str | None = None
    # the device worker's load (shown by /admin/status and the dashboard; routing ignores it):
    # jobs waiting or running, and requests admitted out of max_queue
    queue_depth: int = 0
    requests_in_progress: int = 0
    max_queue: int = 0

    @property
    def is_accelerator(self) -> bool:
        return self.kind != "cpu"

    @classmethod
    def from_json(cls, data: Any) -> NodeDevice:
        if not isinstance(data, dict) or not isinstance(data.get("key"), str):
            raise NodeAnswerError(f"a device needs a 'key': {data!r}")
        return cls(
            key=data["key"],
            kind=str(data.get("kind") or data["key"].split(":")[0]),
            total_memory=_int(data, "total_memory"),
            free_memory=_int(data, "free_memory"),
            state=str(data.get("state") or "ok"),
            reserved_by=data["reserved_by"] if isinstance(data.get("reserved_by"), str) else None,
            queue_depth=_int(data, "queue_depth", 0),
            requests_in_progress=_int(data, "requests_in_progress", 0),
            max_queue=_int(data, "max_queue", 0),
        )


@attrs.frozen
class Discovery:
    """``GET /discovery``: what a neuron can do."""

    node: str
    default_source: str
    devices: tuple[NodeDevice, ...]
    harnesses: tuple[str, ...]
    sources: tuple[str, ...]
    version: str = ""

    @classmethod
    def from_json(cls, data: Any) -> Discovery:
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            raise NodeAnswerError("discovery needs a 'devices' list")
        return cls(
            node=str(data.get("node") or ""),
            default_source=str(data.get("default_source") or "huggingface"),
            devices=tuple(NodeDevice.from_json(d) for d in data["devices"]),
            harnesses=tuple(
                str(h.get("name")) for h in data.get("harnesses") or [] if isinstance(h, dict)
            ),
            sources=tuple(
                str(s.get("scheme")) for s in data.get("sources") or [] if isinstance(s, dict)
            ),
            version=str(data.get("version") or ""),
        )


@attrs.frozen
class NodeModel:
    """One ``ModelEntry`` of ``GET /models``."""

    id: str
    state: str
    device: str | None = None
    harness: str | None = None
    memory_bytes: int = 0
    in_flight: int = 0
    loaded_at: float = 0.0
    last_used: float = 0.0
    context_length: int | None = None
    error: dict[str, Any] | None = None
    # the neuron scheduler's view (docs/neuron.md#the-scheduler): generations running and
    # waiting for a place, and how many may run at once
    running: int = 0
    waiting: int = 0
    max_batch: int = 1
    # what it can serve beyond plain completions (chat, tools, logprobs, structured_output)
    capabilities: tuple[str, ...] = ()
    # every device a multi-device replica spans (primary first); () for one device
    devices: tuple[str, ...] = ()

    @property
    def spans(self) -> tuple[str, ...]:
        return self.devices or ((self.device,) if self.device else ())

    def share_on(self, device_key: str) -> int:
        """Its memory on one device: an equal share over the devices it spans."""
        spans = self.spans
        return self.memory_bytes // len(spans) if device_key in spans else 0

    @classmethod
    def from_json(cls, data: Any) -> NodeModel:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise NodeAnswerError(f"a model entry needs an 'id': {data!r}")
        context = data.get("context_length")
        error = data.get("error")
        return cls(
            id=data["id"],
            state=str(data.get("state") or READY),
            device=data.get("device") if isinstance(data.get("device"), str) else None,
            harness=data.get("harness") if isinstance(data.get("harness"), str) else None,
            memory_bytes=_int(data, "memory_bytes", 0),
            in_flight=_int(data, "in_flight", 0),
            loaded_at=_float(data, "loaded_at"),
            last_used=_float(data, "last_used"),
            context_length=context if isinstance(context, int) else None,
            error=error if isinstance(error, dict) else None,
            running=_int(data, "running", 0),
            waiting=_int(data, "waiting", 0),
            max_batch=max(1, _int(data, "max_batch", 1)),
            devices=_device_list(data.get("devices")),
            capabilities=tuple(
                str(c) for c in data.get("capabilities") or () if isinstance(c, str)
            ),
        )


def _device_list(value: Any) -> tuple[str, ...]:
    """A neuron's ``devices`` list; one device (or an older neuron without it) is ()."""
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def parse_models(data: Any) -> tuple[NodeModel, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise NodeAnswerError("GET /models needs a 'models' list")
    return tuple(NodeModel.from_json(m) for m in data["models"])


@attrs.define
class Health:
    """Debounced health: down after ``down_after`` failures in a row, up on the first success.

    A node starts down (unknown) until its first successful poll, so nothing is routed to a
    neuron that was never seen answering.
    """

    down_after: int = 3
    up: bool = False
    failures: int = 0
    last_error: str | None = None

    def record_success(self) -> bool:
        """Returns True when this success changed the node from down to up."""
        changed = not self.up
        self.up = True
        self.failures = 0
        self.last_error = None
        return changed

    def record_failure(self, error: str) -> bool:
        """Returns True when this failure changed the node from up to down."""
        self.failures += 1
        self.last_error = error
        if self.up and self.failures >= self.down_after:
            self.up = False
            return True
        return False


@attrs.define
class NodeState:
    """Everything the gateway knows about one configured neuron."""

    name: str
    endpoint: str
    health: Health
    discovery: Discovery | None = None
    models: tuple[NodeModel, ...] = ()
    refreshed_at: float = 0.0
    # models by id, for the tuple it was built from (routing asks per request)
    _index: tuple[tuple[NodeModel, ...], dict[str, NodeModel]] | None = attrs.field(
        default=None, init=False, repr=False, eq=False
    )

    @property
    def up(self) -> bool:
        return self.health.up and self.discovery is not None

    def model(self, model_id: str) -> NodeModel | None:
        index = self._index
        if index is None or index[0] is not self.models:  # rebuilt once per new poll answer
            index = (self.models, {m.id: m for m in self.models})
            self._index = index
        return index[1].get(model_id)
