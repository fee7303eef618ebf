"""The source plugin object: defaults for the ``huggingface`` scheme and a factory for sources."""

from __future__ import annotations

import os

import attrs

from cortex.config import HUGGINGFACE_AUTH_ENV, HUGGINGFACE_ENDPOINT, huggingface_cache_dir
from cortex.source import ModelSource, SourceDefaults, SourceSettings


@attrs.frozen
class HuggingFaceSourcePlugin:
    """Serves ``huggingface`` by default and any scheme whose ``[sources.<scheme>]`` names it."""

    name: str = "huggingface"
    schemes: tuple[str, ...] = ("huggingface",)

    def defaults(self, scheme: str) -> SourceDefaults:
        return SourceDefaults(
            endpoint=HUGGINGFACE_ENDPOINT,
            auth_env=HUGGINGFACE_AUTH_ENV,
            cache_dir=huggingface_cache_dir(None, os.environ),
        )

    def create(self, settings: SourceSettings) -> ModelSource:
        from cortex_source_huggingface.hub import HubSource

        return HubSource(settings)
