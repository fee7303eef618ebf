"""The ``helexa`` scheme: the HF wire format at its own endpoint, with its own token and cache.

``helexa:org/name`` and ``huggingface:org/name`` are different artefacts even when the names
match (different bytes, jurisdiction and trust root), so nothing is shared with the Hugging Face
source: not the endpoint, not the token variable, not the cache. Installing this distribution is
all it takes to enable ``helexa:`` ids; ``[sources.helexa]`` in neuron.toml overrides any field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs

from cortex.config import cortex_cache_dir
from cortex.source import ModelSource, SourceDefaults, SourceSettings

HELEXA = "helexa"
HELEXA_ENDPOINT = "https://registry.helexa.ai"
HELEXA_AUTH_ENV = "HELEXA_TOKEN"
HELEXA_CACHE_ENV = "HELEXA_CACHE"


def helexa_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$HELEXA_CACHE``, else ``$CORTEX_CACHE/sources/helexa``, else
    ``~/.cache/cortex/sources/helexa``: never the Hugging Face cache (the neuron refuses a
    configuration where two sources share a cache dir)."""
    environ = os.environ if environ is None else environ
    if environ.get(HELEXA_CACHE_ENV):
        return Path(environ[HELEXA_CACHE_ENV]).expanduser()
    return cortex_cache_dir(HELEXA, environ)


@attrs.frozen
class HelexaSourcePlugin:
    name: str = HELEXA
    schemes: tuple[str, ...] = (HELEXA,)

    def defaults(self, scheme: str) -> SourceDefaults:
        """helexa's endpoint, ``HELEXA_TOKEN`` and cache; another scheme served by this plugin
        gets no token and a cache of its own."""
        if scheme != HELEXA:
            return SourceDefaults(
                endpoint=HELEXA_ENDPOINT,
                auth_env=None,
                cache_dir=cortex_cache_dir(scheme, os.environ),
            )
        return SourceDefaults(
            endpoint=HELEXA_ENDPOINT, auth_env=HELEXA_AUTH_ENV, cache_dir=helexa_cache_dir()
        )

    def create(self, settings: SourceSettings) -> ModelSource:
        """A huggingface_hub-backed source with helexa's settings (the wire format is HF's)."""
        from cortex_source_huggingface.hub import HubSource

        return HubSource(settings)
