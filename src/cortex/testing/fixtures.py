"""pytest fixtures shared by core and plugin tests (loaded by the root conftest.py)."""

from __future__ import annotations

import os

import pytest

from cortex.plugins import reset_registry


@pytest.fixture(autouse=True)
def _fresh_plugin_registry() -> None:
    """Each test sees the plugin registry for its own environment (CORTEX_PLUGINS)."""
    reset_registry()


def cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where no CUDA device is visible."""
    if any("gpu" in item.keywords for item in items) and not cuda_available():
        skip = pytest.mark.skip(reason="needs a visible CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
