"""The source plugin object: defaults for the ``huggingface`` scheme and a factory for sources."""

from __future__ import annotations

import os

import attrs

from cortex.config import (
    HUGGINGFACE,
    HUGGINGFACE_AUTH_ENV,
    HUGGINGFACE_ENDPOINT,
    cortex_cache_dir,
    huggingface_cache_dir,
)
from cortex.source import ModelSource, SourceDefaults, SourceSettings


@attrs.frozen
class HuggingFaceSourcePlugin:
    """Serves ``huggingface`` by default and any scheme whose ``[sources.<scheme>]`` names it
    (a private mirror: same wire format, its own endpoint, token env and cache)."""

    name: str = "huggingface"
    schemes: tuple[str, ...] = (HUGGINGFACE,)

    def defaults(self, scheme: str) -> SourceDefaults:
        """Hugging Face's endpoint, ``HF_TOKEN`` and HF cache for ``huggingface`` only; any other
        scheme gets no token and a cache of its own, so a mirror never receives the HF token
        and never shares the HF cache."""
        if scheme != HUGGINGFACE:
            return SourceDefaults(
                endpoint=HUGGINGFACE_ENDPOINT,
                auth_env=None,
                cache_dir=cortex_cache_dir(scheme, os.environ),
            )
        return SourceDefaults(
            endpoint=HUGGINGFACE_ENDPOINT,
            auth_env=HUGGINGFACE_AUTH_ENV,
            cache_dir=huggingface_cache_dir(None, os.environ),
        )

    def create(self, settings: SourceSettings) -> ModelSource:
        from cortex_source_huggingface.hub import HubSource

        return HubSource(settings)
