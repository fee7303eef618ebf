"""Loading and unloading models: id -> source -> preflight -> harness -> memory check -> fetch
-> load on the device worker.

Each step fails with the error a client can act on: a bad id or unknown scheme is a 400, a
preflight error a 422 carrying the source's error JSON in ``details``, a load that does not fit a
503 with Retry-After naming the bytes required and free. Network work (preflight, fetch) runs in
a thread, never on the event loop and never on a device worker, so a slow download does not hold
up generation. Concurrent loads of one model share one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import attrs

from cortex import harness_choice
from cortex.harness import (
    DEFAULT_MAX_BATCH,
    DeviceFault,
    DeviceOutOfMemory,
    Harness,
    HarnessError,
    LoadOptions,
)
from cortex.neuron.models import FAILED, LOADING, READY, UNLOADING, ModelEntry
from cortex.neuron.node import Node
from cortex.neuron.workers import DevicePoisonedError, DeviceWorker, WorkerError
from cortex.source import ModelIdError, ModelSource, ModelSourceId, Preflight, SourceError
from cortex.wire.errors import ApiError, bad_request, model_not_found

log = logging.getLogger(__name__)

GIB = 2**30
CONFIG_PREFETCH_MAX_BYTES = 4 * 2**20
RETRY_AFTER_MEMORY = 30.0


@attrs.frozen
class LoadRequest:
    model_id: str
    harness: str | None = None
    quant: str | None = None
    device: str | None = None
    context_length: int | None = None
    # continuous batching capacity (docs/neuron.md#the-scheduler); None: the device's default
    max_batch: int | None = None
    kv_tokens: int | None = None
    # how many devices of the node the model spans (tensor parallel); None or 1: one
    devices: int | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LoadRequest:
        model_id = body.get("model_id")
        if not isinstance(model_id, str):
            raise bad_request("'model_id' is required and must be a string", param="model_id")
        values: dict[str, Any] = {"model_id": model_id}
        for key in ("harness", "quant", "device"):
            value = body.get(key)
            if value is not None and not isinstance(value, str):
                raise bad_request(f"'{key}' must be a string", param=key)
            values[key] = value or None
        for key in ("context_length", "max_batch", "kv_tokens", "devices"):
            value = body.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise bad_request(f"'{key}' must be a positive integer", param=key)
            values[key] = value
        return cls(**values)


def parse_model_id(node: Node, raw: Any, param: str = "model_id") -> ModelSourceId:
    """A typed 400 for anything that is not a valid model id; bare ids get the default scheme."""
    if not isinstance(raw, str):
        raise bad_request(f"'{param}' must be a string", param=param)
    try:
        return node.resolver.canonical(raw)
    except ModelIdError as exc:
        raise ApiError(400, exc.code, str(exc), param=param) from None


def source_error(exc: SourceError, stage: str) -> ApiError:
    """A source's typed error as an API error: 400 for config problems, 503 + Retry-After when
    the registry is unreachable or a download failed (retryable), else 422."""
    details = exc.to_json()
    if exc.http_status == 400:
        return ApiError(400, exc.kind, exc.message, param="model_id", details=details)
    if exc.http_status >= 500:
        return ApiError(503, exc.kind, f"{stage}: {exc.message}", retry_after=10, details=details)
    return ApiError(422, exc.kind, f"{stage}: {exc.message}", param="model_id", details=details)


def resolve_source(node: Node, model_id: ModelSourceId) -> ModelSource:
    try:
        return node.resolver.resolve(model_id)[1]
    except SourceError as exc:
        raise source_error(exc, "source") from None


async def preflight(
    node: Node, model_id: ModelSourceId, quant: str | None
) -> tuple[ModelSource, Preflight]:
    source = resolve_source(node, model_id)
    try:
        result = await asyncio.to_thread(source.preflight, model_id, quant)
    except SourceError as exc:
        raise source_error(exc, "preflight") from None
    return source, result


def choose_harness(node: Node, requested: str | None, result: Preflight) -> Harness:
    return harness_choice.choose_harness(node.harnesses, result, requested)  # the one rule


async def prefetch_config(
    source: ModelSource, model_id: ModelSourceId, result: Preflight
) -> dict[str, Any] | None:
    """Fetch ``config.json`` alone (tiny) so the memory estimate can use it; None if absent."""
    if "config.json" not in result.file_names():
        return None
    if result.size_of("config.json") > CONFIG_PREFETCH_MAX_BYTES:
        return None
    try:
        snapshot = await asyncio.to_thread(source.fetch, model_id, ["config.json"])
        data = json.loads((Path(snapshot) / "config.json").read_text())
    except (SourceError, OSError, ValueError) as exc:
        log.info("could not prefetch config.json of %s: %s", model_id, exc)
        return None
    return data if isinstance(data, dict) else None


def pick_device(node: Node, requested: str | None, needed_by_kind: dict[str, int]) -> str:
    """The requested device, or the accelerator with the most free memory that fits, else CPU."""
    if requested is not None:
        if requested not in node.devices:
            raise bad_request(
                f"device {requested!r} does not exist on this node "
                f"(devices: {', '.join(node.devices)})",
                param="device",
            )
        return requested
    usable = [
        k
        for k, w in node.workers.workers.items()
        if not w.poisoned and node.models.reserved_by(k) is None
    ]
    accelerators = sorted(
        (k for k in usable if node.devices[k].kind != "cpu"), key=lambda k: -node.free(k)
    )
    for key in accelerators:
        if node.free(key) >= needed_by_kind.get(node.devices[key].kind, 0):
            return key
    if "cpu" in usable:
        return "cpu"
    if accelerators:
        return accelerators[0]
    raise ApiError(503, "no_device", "every device of this node is poisoned", retry_after=60)


def pick_devices(node: Node, requested: str | None, count: int, share: int) -> list[str]:
    """``count`` devices of one kind for a multi-device load, the primary first: the requested
    device (or the one with the most free memory) and the others with the most free memory,
    each holding no model (a secondary is reserved for the model while it is loaded) and each
    with ``share`` bytes free. Accelerators before the CPU devices. Raises the API error that
    says which device does not fit, or that the node has too few devices."""
    usable = [
        k
        for k, w in node.workers.workers.items()
        if not w.poisoned and node.models.reserved_by(k) is None
    ]
    if requested is not None:
        pick_device(node, requested, {})  # an unknown device is a 400
        kinds = [node.devices[requested].kind]
    else:
        kinds = sorted({node.devices[k].kind for k in usable}, key=lambda k: (k == "cpu", k))
    reasons = []
    for kind in kinds:
        same = [k for k in usable if node.devices[k].kind == kind]
        empty = [k for k in same if not node.models.holding(k)]
        if requested is not None:
            primary = requested
            others = [k for k in empty if k != requested]
        else:
            ordered = sorted(same, key=lambda k: -node.free(k))
            primary = ordered[0] if ordered else ""
            others = [k for k in empty if k != primary]
        others.sort(key=lambda k: -node.free(k))
        chosen = [primary, *others[: count - 1]] if primary else []
        if len(chosen) < count:
            reasons.append(
                f"{len(others) + bool(primary)} usable {kind} device(s) without other models"
            )
            continue
        check_shares(node, chosen, share)
        return chosen
    raise ApiError(
        422,
        "not_enough_devices",
        f"a load over {count} devices needs {count} devices of one kind on this node "
        f"({'; '.join(reasons) or 'none usable'})",
        param="devices",
    )


def check_shares(node: Node, keys: list[str], share: int) -> None:
    """503 ``insufficient_memory`` naming the first of ``keys`` without ``share`` bytes free."""
    short = [k for k in keys if node.free(k) < share]
    if short:
        key = short[0]
        raise ApiError(
            503,
            "insufficient_memory",
            f"a {len(keys)}-device load needs about {_size(share)} on each device; {key} has "
            f"{_size(node.free(key))} free (of {_size(node.budget(key))}); unload a model "
            "or choose other devices",
            retry_after=RETRY_AFTER_MEMORY,
            details={"required_bytes": share, "free_bytes": node.free(key), "device": key},
        )


def load_options(
    node: Node,
    request: LoadRequest,
    kind: str,
    device_key: str | None,
    extra: dict[str, Any] | None = None,
    spans: tuple[str, ...] = (),
) -> LoadOptions:
    """What the harness gets for a load onto a device of ``kind``: the request's choices, and
    for batching its ``max_batch`` or the device's (``[devices."<key>"] max_batch``)."""
    max_batch = request.max_batch
    if max_batch is None:
        settings = node.config.devices.get(device_key or "") if device_key else None
        max_batch = settings.max_batch if settings is not None else DEFAULT_MAX_BATCH
    return LoadOptions(
        quant=request.quant,
        context_length=request.context_length,
        device_kind=kind,
        extra=extra or {},
        max_batch=max_batch,
        kv_tokens=request.kv_tokens,
        devices=tuple(node.devices[k] for k in spans) if len(spans) > 1 else (),
    )


def _worker_error(exc: WorkerError, device: str) -> ApiError:
    if isinstance(exc, DevicePoisonedError):
        return ApiError(503, "device_poisoned", str(exc), retry_after=60)
    return ApiError(503, "queue_full", str(exc), retry_after=2)


class Loader:
    """Loads and unloads models on one node; one instance per node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def load(self, request: LoadRequest, wait: bool = True) -> ModelEntry:
        """Load (or join the load of) a model; returns its entry once ready, or at once (still
        ``loading``) with ``wait=False``. Validation errors are raised either way."""
        node = self.node
        model_id = parse_model_id(node, request.model_id)
        key = str(model_id)
        resolve_source(node, model_id)  # unknown scheme: a 400 before anything is recorded
        if request.device is not None and request.device not in node.devices:
            pick_device(node, request.device, {})  # raises the 400
        if request.device is not None and (owner := node.models.reserved_by(request.device)):
            raise ApiError(
                409,
                "device_reserved",
                f"device {request.device} is reserved for {owner.id}, which spans it; unload "
                "that model or choose another device",
                param="device",
            )
        entry = node.models.get(key)
        if entry is not None:
            if entry.state == READY:
                return entry
            if entry.state == LOADING and entry.load_task is not None:
                return await asyncio.shield(entry.load_task) if wait else entry
            if entry.state == UNLOADING:
                raise ApiError(
                    409,
                    "model_unloading",
                    f"model {key!r} is being unloaded; load it again when that finished",
                    retry_after=2,
                )
            node.models.remove(key)  # failed before: try again
        worker = node.workers.get(request.device or "cpu") or next(iter(node.workers))
        entry = ModelEntry(id=key, harness=request.harness or "", device="", worker=worker)
        node.models.put(entry)
        entry.load_task = asyncio.create_task(
            self._load(entry, model_id, request, keep_failed=not wait)
        )
        entry.load_task.add_done_callback(_retrieve_exception)
        if not wait:
            return entry
        return await asyncio.shield(entry.load_task)

    async def _load(
        self,
        entry: ModelEntry,
        model_id: ModelSourceId,
        request: LoadRequest,
        keep_failed: bool = False,
    ) -> ModelEntry:
        node = self.node
        started = time.monotonic()
        try:
            await self._run_load(entry, model_id, request)
        except ApiError as exc:
            node.metrics.loads.labels("failed").inc()
            if not entry.device and not keep_failed:
                # refused before a device was chosen (bad repo, no harness, does not fit):
                # the caller got the error; nothing happened on this node worth listing
                node.models.remove(entry.id)
                raise
            entry.fail(exc.code, exc.message, exc.details)
            entry.reserved_bytes = 0
            raise
        except Exception as exc:  # a harness bug: report it, keep the node up
            log.exception("loading %s failed", entry.id)
            entry.fail("load_failed", f"{type(exc).__name__}: {exc}")
            entry.reserved_bytes = 0
            node.metrics.loads.labels("failed").inc()
            raise ApiError(422, "load_failed", f"loading {entry.id} failed: {exc}") from exc
        entry.load_seconds = round(time.monotonic() - started, 3)
        node.metrics.loads.labels("ok").inc()
        node.metrics.load_duration.observe(entry.load_seconds)
        return entry

    async def _run_load(
        self, entry: ModelEntry, model_id: ModelSourceId, request: LoadRequest
    ) -> None:
        node = self.node
        source, result = await preflight(node, model_id, request.quant)
        harness = choose_harness(node, request.harness, result)
        entry.harness = harness.name
        config = await prefetch_config(source, model_id, result)
        extra = {"config": config} if config is not None else {}

        def options_for(kind: str, device_key: str | None = None) -> LoadOptions:
            return load_options(node, request, kind, device_key, extra)

        count = request.devices or 1
        if count > 1:
            await self._plan_spanning(entry, harness, result, request, extra, count)
            return await self._finish_load(entry, harness, source, model_id, result)
        kinds = {d.kind for d in node.devices.values()}
        needed = {kind: harness.estimate_memory(result, options_for(kind)) for kind in kinds}
        device_key = pick_device(node, request.device, needed)
        device = node.devices[device_key]
        worker = node.workers.get(device_key)
        assert worker is not None
        options = options_for(device.kind, device_key)
        required = harness.estimate_memory(result, options)
        free = node.free(device_key)
        if required > free:
            raise ApiError(
                503,
                "insufficient_memory",
                f"{entry.id} needs about {_size(required)} on {device_key}, which has "
                f"{_size(free)} free (of {_size(node.budget(device_key))}); unload a model "
                "or choose another device",
                retry_after=RETRY_AFTER_MEMORY,
                details={"required_bytes": required, "free_bytes": free, "device": device_key},
            )
        entry.device = device_key
        entry.worker = worker
        entry.reserved_bytes = required
        entry.options = options
        await self._finish_load(entry, harness, source, model_id, result)

    async def _plan_spanning(
        self,
        entry: ModelEntry,
        harness: Harness,
        result: Preflight,
        request: LoadRequest,
        extra: dict[str, Any],
        count: int,
    ) -> None:
        """The plan of a load over ``count`` devices: the harness must allow it, and each
        device must have an equal share of the estimate free (docs/neuron.md#several-devices)."""
        node = self.node
        allowed = int(getattr(harness, "max_devices", 1) or 1)
        if count > allowed:
            raise ApiError(
                422,
                "harness_single_device",
                f"harness {harness.name!r} loads a model onto at most {allowed} device(s), "
                f"not {count}",
                param="devices",
            )
        kind_of = (
            node.devices[request.device].kind
            if request.device in node.devices
            else next(
                (d.kind for d in node.devices.values() if d.kind != "cpu"),
                "cpu",
            )
        )
        total = harness.estimate_memory(result, load_options(node, request, kind_of, None, extra))
        share = -(-total // count)
        spans = tuple(pick_devices(node, request.device, count, share))
        primary = spans[0]
        options = load_options(node, request, node.devices[primary].kind, primary, extra, spans)
        total = harness.estimate_memory(result, options)  # with every rank's own overhead
        check_shares(node, list(spans), -(-total // count))
        worker = node.workers.get(primary)
        assert worker is not None
        entry.device = primary
        entry.devices = spans
        entry.worker = worker
        entry.reserved_bytes = total
        entry.options = options

    async def _finish_load(
        self,
        entry: ModelEntry,
        harness: Harness,
        source: ModelSource,
        model_id: ModelSourceId,
        result: Preflight,
    ) -> None:
        """Fetch the files and load on the (primary) device's worker, as planned."""
        node = self.node
        device_key = entry.device
        device = node.devices[device_key]
        worker = entry.worker
        options = entry.options
        assert options is not None
        files = harness.files_needed(result)
        try:
            snapshot = await asyncio.to_thread(source.fetch, model_id, files)
        except SourceError as exc:
            raise source_error(exc, "fetch") from None
        try:
            handle = await worker.run(lambda: harness.load(Path(snapshot), device, options))
            memory = await worker.run(handle.memory_bytes, internal=True)
        except WorkerError as exc:
            raise _worker_error(exc, device_key) from None
        except DeviceOutOfMemory as exc:
            raise ApiError(503, "device_out_of_memory", str(exc), retry_after=30) from None
        except DeviceFault as exc:
            raise ApiError(503, "device_poisoned", f"device fault while loading: {exc}") from None
        except HarnessError as exc:
            raise ApiError(422, "load_failed", f"{harness.name} could not load: {exc}") from None
        entry.handle = handle
        entry.memory_bytes = int(memory)
        entry.reserved_bytes = max(int(memory), 0)
        entry.context_length = int(handle.context_length)
        entry.max_batch = options.max_batch
        entry.loaded_at = time.time()
        entry.last_used = entry.loaded_at
        entry.state = READY
        entry.error = None
        where = "+".join(entry.spans)
        log.info("loaded %s on %s with %s (%s)", entry.id, where, harness.name, _size(memory))

    async def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        request = LoadRequest.from_json(body)
        model_id = parse_model_id(self.node, request.model_id)
        _source, result = await preflight(self.node, model_id, request.quant)
        harness = choose_harness(self.node, request.harness, result)
        kind = "cuda" if any(d.kind == "cuda" for d in self.node.devices.values()) else "cpu"
        if request.device is not None:
            kind = self.node.devices[pick_device(self.node, request.device, {})].kind
        options = load_options(self.node, request, kind, request.device)
        return {
            "model_id": str(model_id),
            "harness": harness.name,
            "memory_bytes": harness.estimate_memory(result, options),
            "download_bytes": result.download_bytes,
            "device_kind": kind,
        }

    async def unload(self, raw_id: Any, wait_seconds: float | None = None) -> dict[str, Any]:
        """Wait for in-flight requests (up to a bound), then free the model's memory."""
        node = self.node
        model_id = str(parse_model_id(node, raw_id))
        entry = node.models.get(model_id)
        if entry is None:
            raise model_not_found(model_id, "it is not loaded on this node")
        if entry.state == LOADING and entry.load_task is not None:
            with contextlib.suppress(ApiError):
                await asyncio.shield(entry.load_task)
        if entry.state == UNLOADING:
            raise ApiError(409, "model_unloading", f"{model_id} is already being unloaded")
        freed = entry.memory_bytes
        if entry.state == FAILED or entry.handle is None:
            node.models.remove(model_id)
            return {"model_id": model_id, "state": "unloaded", "freed_bytes": 0}
        entry.state = UNLOADING
        bound = node.unload_wait_seconds if wait_seconds is None else wait_seconds
        try:
            await asyncio.wait_for(entry.idle.wait(), timeout=bound)
        except TimeoutError:
            log.warning(
                "unloading %s with %d requests still in flight after %.0fs",
                model_id,
                entry.in_flight,
                bound,
            )
        handle, entry.handle = entry.handle, None
        await release(entry.worker, handle)
        node.models.remove(model_id)
        node.metrics.unloads.inc()
        log.info("unloaded %s from %s (%s)", model_id, entry.device, _size(freed))
        return {"model_id": model_id, "state": "unloaded", "freed_bytes": freed}

    async def unload_all(self, wait_seconds: float) -> None:
        for entry in node_entries(self.node):
            try:
                await self.unload(entry.id, wait_seconds)
            except ApiError as exc:
                log.warning("unload of %s at shutdown: %s", entry.id, exc.message)


def _retrieve_exception(task: asyncio.Task[ModelEntry]) -> None:
    """A load nobody waits for (``wait: false``) records its error in the entry; retrieving it
    here keeps asyncio from logging "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


def node_entries(node: Node) -> list[ModelEntry]:
    return node.models.all()


async def release(worker: DeviceWorker, handle: Any) -> None:
    """Unload on the device's thread; a poisoned worker cannot run it (the process will exit)."""
    if handle is None:
        return
    try:
        # retire: generations still running on the model end first (model_unloading)
        await worker.run(functools.partial(worker.retire, handle), internal=True)
    except WorkerError as exc:
        log.warning("could not unload on %s: %s", worker.device.key, exc)
    except Exception:
        log.exception("unload failed on %s", worker.device.key)


def _size(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
