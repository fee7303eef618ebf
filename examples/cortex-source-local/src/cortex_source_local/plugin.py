"""The source plugin object: the ``local`` scheme's defaults and a factory for sources."""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from cortex.source import ModelSource, SourceDefaults, SourceSettings

DEFAULT_STORE = "file:///srv/models"


@attrs.frozen
class LocalSourcePlugin:
    """Serves the ``local`` scheme, and any scheme whose ``[sources.<scheme>]`` says
    ``plugin = "local"`` (one scheme per store, e.g. ``nfs`` and ``scratch``)."""

    name: str = "local"
    schemes: tuple[str, ...] = ("local",)

    def defaults(self, scheme: str) -> SourceDefaults:
        """``file:///srv/models``, no token. The cache dir is never written (fetch copies
        nothing) but every scheme needs a distinct one, so it gets cortex's usual folder."""
        base = os.environ.get("CORTEX_CACHE") or "~/.cache/cortex"
        return SourceDefaults(
            endpoint=DEFAULT_STORE,
            auth_env=None,
            cache_dir=(Path(base).expanduser() / "sources" / scheme),
        )

    def create(self, settings: SourceSettings) -> ModelSource:
        from cortex_source_local.source import LocalSource

        return LocalSource(settings)
