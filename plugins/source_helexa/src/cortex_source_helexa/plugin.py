"""The ``helexa`` scheme: the HF wire format at its own endpoint, token and cache."""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from cortex.source import ModelSource, SourceDefaults, SourceSettings

HELEXA_ENDPOINT = "https://registry.helexa.ai"
HELEXA_AUTH_ENV = "HELEXA_TOKEN"


def helexa_cache_dir() -> Path:
    """``$HELEXA_CACHE``, else ``$CORTEX_CACHE/sources/helexa``, else
    ``~/.cache/cortex/sources/helexa``: never inside the Hugging Face cache."""
    if os.environ.get("HELEXA_CACHE"):
        return Path(os.environ["HELEXA_CACHE"]).expanduser()
    base = os.environ.get("CORTEX_CACHE") or "~/.cache/cortex"
    return Path(base).expanduser() / "sources" / "helexa"


@attrs.frozen
class HelexaSourcePlugin:
    name: str = "helexa"
    schemes: tuple[str, ...] = ("helexa",)

    def defaults(self, scheme: str) -> SourceDefaults:
        return SourceDefaults(
            endpoint=HELEXA_ENDPOINT, auth_env=HELEXA_AUTH_ENV, cache_dir=helexa_cache_dir()
        )

    def create(self, settings: SourceSettings) -> ModelSource:
        from cortex_source_huggingface.hub import HubSource

        return HubSource(settings)
