"""Routing decisions: pure functions over the fleet view, the model profiles and live usage.

Nothing here does I/O, so every rule (alias resolution, least-busy replica, placement, eviction
planning, why a model cannot be placed) is tested on plain data.
"""

from __future__ import annotations

import attrs

from cortex.config import ModelProfile, ModelsConfig
from cortex.eviction import EvictionCandidate, EvictionStrategy
from cortex.gateway.nodes import LOADING, READY, NodeDevice, NodeModel, NodeState
from cortex.gateway.usage import Usage
from cortex.source import MissingSlashError, ModelIdError, ModelSourceId
from cortex.wire.errors import ApiError, model_not_found


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


@attrs.frozen
class Resolved:
    """A client's model name resolved: ``canonical`` is ``scheme:org/name``."""

    requested: str
    canonical: str
    profile: ModelProfile | None
    alias_of: str | None = None


def canonical_or_none(raw: str, default_source: str) -> str | None:
    try:
        return str(ModelSourceId.parse(raw).with_default_scheme(default_source))
    except ModelIdError:
        return None


def find_profile(models: ModelsConfig, canonical: str, default_source: str) -> ModelProfile | None:
    for profile in models.models:
        if canonical_or_none(profile.id, default_source) == canonical:
            return profile
    return None


def resolve(requested: str, models: ModelsConfig, default_source: str) -> Resolved:
    """Alias (one level) -> canonical id -> profile.

    A name without a '/' (``gpt-4``) that is no alias is an unknown model: 404, as the OpenAI
    API answers. A name that is meant as an id but breaks the id grammar (``acme/x{}``,
    ``acme/a/b``, ``../x``) is a 400 with the parse error's code: no registry could serve it, and
    the neuron would refuse it the same way.
    """
    target = models.aliases.get(requested)
    name = target if target is not None else requested
    try:
        canonical = str(ModelSourceId.parse(name).with_default_scheme(default_source))
    except MissingSlashError:
        raise model_not_found(requested, "not an alias and not a model id ('org/name')") from None
    except ModelIdError as exc:
        raise ApiError(400, exc.code, str(exc), param="model") from None
    return Resolved(
        requested=requested,
        canonical=canonical,
        profile=find_profile(models, canonical, default_source),
        alias_of=canonical if target is not None else None,
    )


class Resolver:
    """:func:`resolve` with memory. The models config does not change while a gateway runs, so
    a name resolves the same way for as long as the default source stays the same; parsing the
    id and scanning every profile on each request was measurable on the hot path. Names that do
    not resolve are not kept, and the memory is bounded (cleared when full)."""

    MAX_ENTRIES = 4096

    def __init__(self, models: ModelsConfig) -> None:
        self.models = models
        self._known: dict[tuple[str, str], Resolved] = {}

    def __call__(self, requested: str, default_source: str) -> Resolved:
        key = (requested, default_source)
        found = self._known.get(key)
        if found is None:
            found = resolve(requested, self.models, default_source)
            if len(self._known) >= self.MAX_ENTRIES:
                self._known.clear()
            self._known[key] = found
        return found

    def clear(self) -> None:
        """Forget every name: a profile changed at run time (a pin from the admin API)."""
        self._known.clear()


def known_on(nodes: list[NodeState], resolved: Resolved) -> tuple[bool, bool]:
    """(known at all: a profile, or on some node's model list; known only on neurons that are
    down)."""
    on_up = on_down = False
    for node in nodes:
        if node.model(resolved.canonical) is not None:
            if node.up:
                on_up = True
            else:
                on_down = True
    return resolved.profile is not None or on_up or on_down, on_down and not on_up


# ---- replicas ---------------------------------------------------------------------------------


def replicas(
    nodes: list[NodeState], canonical: str, usage: Usage, state: str = READY
) -> list[tuple[NodeState, NodeModel]]:
    """Up nodes where the model is in ``state`` (and not being unloaded by the gateway)."""
    found = []
    for node in nodes:
        if not node.up:
            continue
        model = node.model(canonical)
        if (
            model is not None
            and model.state == state
            and (node.name, canonical) not in (usage.evicting)
        ):
            found.append((node, model))
    return found


def least_busy(
    candidates: list[tuple[NodeState, NodeModel]], canonical: str, usage: Usage
) -> tuple[NodeState, NodeModel] | None:
    """The replica with the most room: the fewest requests in flight for the generations it
    can run at once (the gateway's live count over the neuron's ``max_batch``: a replica that
    batches 64 takes more than one that batches 8), then the fewest waiting on the neuron, then
    the fewest in flight there."""
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda nm: (
            usage.busy(nm[0].name, canonical) / nm[1].max_batch,
            nm[1].waiting,
            nm[1].in_flight,
            nm[0].name,
        ),
    )


# ---- placement --------------------------------------------------------------------------------


@attrs.frozen
class Placement:
    """Load ``canonical`` on ``node``/``device`` after unloading ``victims`` there."""

    node: str
    device: str
    victims: tuple[str, ...] = ()
    freed_bytes: int = 0
    # a multi-device replica: every device it will span on ``node``, ``device`` first
    devices: tuple[str, ...] = ()


def node_allowed(profile: ModelProfile | None, node: NodeState) -> bool:
    return profile is None or not profile.nodes or node.name in profile.nodes


def node_capable(profile: ModelProfile | None, node: NodeState, canonical: str) -> str | None:
    """None when the node can load the model, else why not."""
    assert node.discovery is not None
    if profile is not None and profile.harness and profile.harness not in node.discovery.harnesses:
        return f"{node.name} has no {profile.harness!r} harness"
    scheme = canonical.split(":", 1)[0]
    if node.discovery.sources and scheme not in node.discovery.sources:
        return f"{node.name} has no {scheme!r} source"
    return None


def placement_devices(node: NodeState) -> list[NodeDevice]:
    """Accelerators when the node has any, else its CPU: a GPU node never places on its RAM.
    A device reserved for a multi-device replica (one of its secondaries) takes nothing else."""
    assert node.discovery is not None
    usable = [d for d in node.discovery.devices if d.state == "ok" and d.reserved_by is None]
    accelerators = [d for d in usable if d.is_accelerator]
    return accelerators or [d for d in usable if not d.is_accelerator]


def device_free(node: NodeState, device: NodeDevice, usage: Usage) -> int:
    """Free bytes: the neuron's figure, capped by total minus what its models hold, minus what
    loads in progress have reserved."""
    held = sum(m.share_on(device.key) for m in node.models)
    free = min(device.free_memory, device.total_memory - held)
    return max(0, free - usage.reserved(node.name, device.key))


def eviction_candidates(
    node: NodeState,
    device: NodeDevice,
    usage: Usage,
    models: ModelsConfig,
    default_source: str,
) -> list[EvictionCandidate]:
    candidates = []
    for m in node.models:
        # a multi-device replica is a candidate on each device it spans, for its share there;
        # evicting it (one unload) frees all of them
        if device.key not in m.spans or m.state != READY:
            continue
        if (node.name, m.id) in usage.evicting:
            continue
        profile = find_profile(models, m.id, default_source)
        candidates.append(
            EvictionCandidate(
                model_id=m.id,
                memory_bytes=m.share_on(device.key),
                last_used=max(
                    m.last_used, m.loaded_at, usage.last_used.get((node.name, m.id), 0.0)
                ),
                priority=profile.priority if profile else 0,
                pinned=profile.pinned if profile else False,
                in_flight=max(m.in_flight, usage.busy(node.name, m.id)),
            )
        )
    return candidates


def place(
    resolved: Resolved,
    needed: int,
    configured_nodes: list[NodeState],
    usage: Usage,
    strategy: EvictionStrategy,
    models: ModelsConfig,
    default_source: str,
    retry_after: float = 5.0,
) -> Placement:
    """Where to load a model, or an :class:`ApiError` that says why it cannot be placed now."""
    canonical, profile = resolved.canonical, resolved.profile
    allowed = [n for n in configured_nodes if node_allowed(profile, n)]
    if not allowed:
        raise ApiError(
            422,
            "no_eligible_node",
            f"model {resolved.requested!r} may only run on {profile.nodes if profile else []}, "
            "and no such neuron is configured",
            param="model",
        )
    down = [n.name for n in allowed if not n.up]
    up = [n for n in allowed if n.up]
    incapable = [why for n in up if (why := node_capable(profile, n, canonical))]
    capable = [n for n in up if node_capable(profile, n, canonical) is None]

    # A load already running on a neuron (not started by us): join it there, no eviction (the
    # neuron coalesces a second /models/load). Before the neuron picked a device, the entry has
    # none yet: the load is joined all the same, on the device placement would choose there.
    for node in capable:
        entry = node.model(canonical)
        if entry is not None and entry.state == LOADING:
            joined = entry.device or next((d.key for d in placement_devices(node)), "")
            if joined:
                return Placement(node.name, joined)

    if not capable:
        if down:
            raise ApiError(
                503,
                "service_unavailable",
                f"model {resolved.requested!r}: the neurons that could serve it are down "
                f"({', '.join(sorted(down))})",
                retry_after=retry_after,
            )
        raise ApiError(
            422,
            "no_capable_node",
            f"model {resolved.requested!r}: no neuron can load it ({'; '.join(incapable)})",
            param="model",
        )

    count = profile.devices if profile is not None and profile.devices else 1
    if count > 1:
        return place_spanning(
            resolved, needed, count, capable, usage, strategy, models, default_source, retry_after
        )
    devices = [(n, d) for n in capable for d in placement_devices(n)]
    fitting = [(n, d, device_free(n, d, usage)) for n, d in devices]
    fitting = [f for f in fitting if f[2] >= needed]
    if fitting:
        node, device, _ = max(fitting, key=lambda f: (f[2], f[0].name))
        return Placement(node.name, device.key)

    big_enough = [(n, d) for n, d in devices if d.total_memory >= needed]
    if not big_enough:
        largest = max(devices, key=lambda nd: nd[1].total_memory, default=None)
        where = f"{largest[0].name}/{largest[1].key}" if largest else "none"
        size = largest[1].total_memory if largest else 0
        if down:
            raise ApiError(
                503,
                "service_unavailable",
                f"model {resolved.requested!r} needs {_mib(needed)}, more than any healthy "
                f"device holds (largest: {where}, {_mib(size)}); down: {', '.join(sorted(down))}",
                retry_after=retry_after,
            )
        raise ApiError(
            422,
            "model_too_large",
            f"model {resolved.requested!r} needs {_mib(needed)} but the largest device it may "
            f"use is {where} with {_mib(size)}",
            param="model",
        )

    plans = []
    reasons = []
    for node, device in big_enough:
        free = device_free(node, device, usage)
        candidates = eviction_candidates(node, device, usage, models, default_source)
        plan = strategy.plan(candidates, needed, free)
        if not plan.fits:
            reasons.append(f"{node.name}/{device.key}: {plan.reason}")
            continue
        sizes = {c.model_id: c.memory_bytes for c in candidates}
        freed = sum(sizes.get(v, 0) for v in plan.victims)
        plans.append(
            (freed, len(plan.victims), node.name, Placement(node.name, device.key, plan.victims))
        )
    if plans:
        freed, _, _, chosen = min(plans, key=lambda p: p[:3])
        return attrs.evolve(chosen, freed_bytes=freed)
    raise ApiError(
        503,
        "insufficient_memory",
        f"model {resolved.requested!r} needs {_mib(needed)} and nothing can be evicted to make "
        f"room now ({'; '.join(reasons)})",
        retry_after=retry_after,
    )


def place_spanning(
    resolved: Resolved,
    needed: int,
    count: int,
    capable: list[NodeState],
    usage: Usage,
    strategy: EvictionStrategy,
    models: ModelsConfig,
    default_source: str,
    retry_after: float,
) -> Placement:
    """A replica over ``count`` devices of one node (``devices`` in its profile): each needs
    ``needed / count``. On each node, the ``count`` placement devices with the most free
    memory; where they do not fit, the eviction strategy plans on each of them and the
    victims are the union (a multi-device victim counts once, and frees every device it
    spans). The node needing the fewest freed bytes wins. The neuron chooses the same
    devices again (its ``pick_devices``), with ``device`` as the primary."""
    share = -(-needed // count)
    plans = []
    reasons = []
    for node in capable:
        devices = sorted(placement_devices(node), key=lambda d: -device_free(node, d, usage))
        if len(devices) < count:
            reasons.append(f"{node.name} has {len(devices)} usable device(s), not {count}")
            continue
        too_small = [d for d in devices[:count] if d.total_memory < share]
        devices = [d for d in devices if d.total_memory >= share][:count]
        if len(devices) < count:
            reasons.append(
                f"{node.name}: {too_small[0].key} holds {_mib(too_small[0].total_memory)}, "
                f"less than the {_mib(share)} share"
            )
            continue
        victims: list[str] = []
        freed = 0
        failed = None
        for device in devices:
            free = device_free(node, device, usage)
            candidates = eviction_candidates(node, device, usage, models, default_source)
            # what victims already chosen free here
            free += sum(c.memory_bytes for c in candidates if c.model_id in victims)
            rest = [c for c in candidates if c.model_id not in victims]
            plan = strategy.plan(rest, share, free)
            if not plan.fits:
                failed = f"{node.name}/{device.key}: {plan.reason}"
                break
            sizes = {c.model_id: c.memory_bytes for c in rest}
            victims.extend(plan.victims)
            freed += sum(sizes.get(v, 0) for v in plan.victims)
        if failed is not None:
            reasons.append(failed)
            continue
        keys = tuple(d.key for d in devices)
        plans.append(
            (
                freed,
                len(victims),
                node.name,
                Placement(node.name, keys[0], tuple(victims), freed, keys),
            )
        )
    if plans:
        return min(plans, key=lambda p: p[:3])[3]
    raise ApiError(
        503,
        "insufficient_memory",
        f"model {resolved.requested!r} needs {count} devices with {_mib(share)} each on one "
        f"node, and none can make room now ({'; '.join(reasons) or 'no capable node'})",
        retry_after=retry_after,
    )
