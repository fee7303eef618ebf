"""Pinning and unpinning a model at run time (``POST /admin/models/pin`` and ``.../unpin``).

A pin is the ``pinned`` setting of a model's profile in ``models.toml``: a pinned model is never
evicted to make room and never unloaded by ``keep_alive``. Changing it at run time replaces the
profile in the gateway's models config, which the eviction planner, the ``keep_alive`` check, the
catalogue and ``/admin/status`` all read, so a pin takes effect at once and everywhere.

What a run-time pin is not: it is not written back to ``models.toml`` (a restart brings back
what the file says) and not shared with other gateways in front of the same neurons. A model
without a profile (loaded on a neuron by hand, or a neuron's default model) cannot be pinned:
giving it a profile would also make it loadable from the catalogue, which a pin should not do.
"""

from __future__ import annotations

import attrs

from cortex.config import ModelProfile
from cortex.gateway.router import Resolved, canonical_or_none
from cortex.gateway.service import Gateway
from cortex.wire.errors import ApiError, model_not_found


def set_pinned(gateway: Gateway, resolved: Resolved, pinned: bool) -> ModelProfile:
    """Set ``pinned`` on the profile of ``resolved``; returns the profile now in force."""
    profiles = gateway.models.models
    default_source = gateway.default_source
    for index, profile in enumerate(profiles):
        if canonical_or_none(profile.id, default_source) == resolved.canonical:
            if profile.pinned != pinned:
                profiles[index] = attrs.evolve(profile, pinned=pinned)
                gateway.resolver.clear()  # cached resolutions hold the old profile
            return profiles[index]
    if any(n.model(resolved.canonical) is not None for n in gateway.nodes()):
        raise ApiError(
            422,
            "model_not_configured",
            f"{resolved.canonical} has no profile in models.toml, and a pin is a profile "
            "setting: add it there (with pinned = true to keep it pinned across restarts)",
            param="model",
        )
    raise model_not_found(resolved.requested, "not loaded anywhere and not in models.toml")
