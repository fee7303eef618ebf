"""An autouse fixture for the source plugins' test suites: every test runs with its own empty
caches, without the tokens of whoever runs the suite, and with only this project's two source
plugins (other installed plugins would add schemes of their own).

A plugin's ``tests/conftest.py`` imports it (``from cortex.testing.source_isolation import
isolated_source_caches``); it is not part of the ``cortex.testing`` pytest plugin, so it
applies only where it is imported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SOURCE_PLUGINS = "source-huggingface,source-helexa"
TOKENS_AND_CACHES = ("HF_TOKEN", "HELEXA_TOKEN", "HELEXA_CACHE", "HF_HOME")


@pytest.fixture(autouse=True)
def isolated_source_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_PLUGINS", SOURCE_PLUGINS)
    monkeypatch.setenv("CORTEX_CACHE", str(tmp_path / "cortex-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in TOKENS_AND_CACHES:
        monkeypatch.delenv(name, raising=False)


__all__ = ["isolated_source_caches"]
