"""A source backed by huggingface_hub (preflight and fetch arrive with the sources issue)."""

from __future__ import annotations

import os
from pathlib import Path

from cortex.source import FetchError, ModelSourceId, Preflight, ProgressCallback, SourceSettings


class HubSource:
    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self._token = os.environ.get(settings.auth_env) if settings.auth_env else None

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def preflight(self, model_id: ModelSourceId, quant: str | None = None) -> Preflight:
        raise FetchError(str(model_id), "preflight is not implemented yet")

    def fetch(
        self, model_id: ModelSourceId, files: list[str], progress: ProgressCallback | None = None
    ) -> Path:
        raise FetchError(str(model_id), "fetch is not implemented yet")
