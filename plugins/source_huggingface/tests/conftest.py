"""Keep every source test away from the real caches and tokens of whoever runs the suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only this project's two source plugins (other installed plugins add schemes of their own).
    monkeypatch.setenv("CORTEX_PLUGINS", "source-huggingface,source-helexa")
    monkeypatch.setenv("CORTEX_CACHE", str(tmp_path / "cortex-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_TOKEN", "HELEXA_TOKEN", "HELEXA_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
