"""``GET /v1/models``: the fleet's merged catalogue, in the OpenAI list shape.

Listed: every model loaded (or loading) on a healthy neuron, every ``models.toml`` profile some
healthy neuron could load, and every alias. Beside the OpenAI fields (``id``, ``object``,
``created``, ``owned_by``) each entry says where the model is loaded and in which state
(``loaded_on``, ``state``), and an alias says which id it points to (``alias_for``). Entries are
sorted by id so the list is stable between calls.
"""

from __future__ import annotations

from typing import Any

from cortex.config import ModelsConfig
from cortex.gateway.nodes import FAILED, LOADING, READY, NodeState
from cortex.gateway.router import canonical_or_none, node_allowed, node_capable
from cortex.gateway.usage import Usage

AVAILABLE = "available"  # not loaded anywhere, but a healthy neuron may load it
UNAVAILABLE = "unavailable"  # an alias whose target no healthy neuron can serve now


def _overall_state(states: list[str], loadable: bool) -> str:
    if READY in states:
        return READY
    if LOADING in states:
        return LOADING
    if loadable:
        return AVAILABLE
    return states[0] if states else UNAVAILABLE


# Request parameters every model takes, and those a capability adds (OpenRouter's
# ``supported_parameters`` vocabulary, which OpenAI-style clients read to decide what to send).
_BASE_PARAMETERS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_CAPABILITY_PARAMETERS = {
    "tools": ("tools", "tool_choice"),
    "structured_output": ("response_format", "structured_outputs"),
    "logprobs": ("logprobs", "top_logprobs"),
}


def _description(context: int | None, capabilities: tuple[str, ...]) -> dict[str, Any]:
    """What a client needs to budget and shape requests, as a loaded copy reports it (null and
    empty until one is loaded): the context window under the names clients read (OpenRouter's
    ``context_length``, vLLM's ``max_model_len``), the most a completion can be, and what the
    model can do."""
    parameters = list(_BASE_PARAMETERS)
    for capability in capabilities:
        parameters += _CAPABILITY_PARAMETERS.get(capability, ())
    return {
        "context_length": context,
        "max_model_len": context,
        "max_output_tokens": context - 1 if context else None,
        "capabilities": sorted(capabilities),
        "supported_parameters": parameters if context else [],
    }


def build_catalogue(
    nodes: list[NodeState], models: ModelsConfig, usage: Usage, default_source: str
) -> list[dict[str, Any]]:
    """The ``data`` list of ``/v1/models``."""
    up = [n for n in nodes if n.up]
    placements: dict[str, list[dict[str, Any]]] = {}
    created: dict[str, float] = {}
    described: dict[str, tuple[int | None, tuple[str, ...]]] = {}
    for node in up:
        for m in node.models:
            if m.state == FAILED:
                continue
            if m.context_length is not None:  # a loaded copy says what the model is
                described[m.id] = (m.context_length, m.capabilities)
            placements.setdefault(m.id, []).append(
                {
                    "node": node.name,
                    "device": m.device,
                    "state": m.state,
                    "memory_bytes": m.memory_bytes,
                    "in_flight": max(m.in_flight, usage.busy(node.name, m.id)),
                }
            )
            if m.loaded_at:
                created[m.id] = min(created.get(m.id, m.loaded_at), m.loaded_at)

    loadable: set[str] = set()
    profiles: dict[str, Any] = {}
    for profile in models.models:
        canonical = canonical_or_none(profile.id, default_source)
        if canonical is None:
            continue
        profiles[canonical] = profile
        if any(
            node_allowed(profile, n) and node_capable(profile, n, canonical) is None for n in up
        ):
            loadable.add(canonical)

    def entry(model_id: str, target: str, alias_for: str | None) -> dict[str, Any]:
        where = sorted(placements.get(target, []), key=lambda p: p["node"])
        profile = profiles.get(target)
        return {
            "id": model_id,
            "object": "model",
            "created": int(created.get(target, 0)),
            "owned_by": target.split(":", 1)[0],
            "state": _overall_state([p["state"] for p in where], target in loadable),
            "loaded_on": where,
            "alias_for": alias_for,
            "pinned": bool(profile.pinned) if profile else False,
            **_description(*described.get(target, (None, ()))),
        }

    entries = {model_id: entry(model_id, model_id, None) for model_id in placements}
    for canonical in loadable:
        entries.setdefault(canonical, entry(canonical, canonical, None))
    for alias, target in models.aliases.items():
        canonical = canonical_or_none(target, default_source) or target
        entries[alias] = entry(alias, canonical, canonical)
    return [entries[k] for k in sorted(entries)]
