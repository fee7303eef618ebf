"""pytest fixtures shared by core and plugin tests (loaded by the root conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cortex.plugins import reset_registry

if TYPE_CHECKING:
    from cortex.testing.registry import RunningRegistry


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


# ---- tiny transformers models (built once per test session) -----------------------------------


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama model + trained BPE tokenizer + ChatML template (read-only:
    copy it before changing anything). Built once per session."""
    from cortex.testing.tiny_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny-models"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``tiny_llama_dir`` with a Qwen2 architecture (same tokenizer)."""
    from cortex.testing.tiny_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny-models"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT embedding model in the sentence-transformers layout (mean pooling,
    normalised), with the tiny tokenizer."""
    from cortex.testing.tiny_models import build_tiny_embedding_model

    return build_tiny_embedding_model(tmp_path_factory.mktemp("tiny-embedder") / "bert")


@pytest.fixture
def hf_registry() -> Iterator[Callable[..., RunningRegistry]]:
    """Factory: ``hf_registry(root, token=None) -> RunningRegistry`` serving ``root`` on
    loopback (see cortex.testing.registry); every registry started is stopped after the test."""
    from cortex.testing.registry import start_registry

    started: list[RunningRegistry] = []

    def start(root: Path, token: str | None = None) -> RunningRegistry:
        registry = start_registry(root, token=token)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture(scope="session")
def tiny_gguf_repo(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF repo directory written from ``tiny_llama_dir``: ``tiny-F32.gguf`` and
    ``tiny-F16.gguf`` (two quants to choose from) and a README. Built once per session."""
    from cortex.testing.tiny_gguf import build_tiny_gguf_repo

    return build_tiny_gguf_repo(
        tmp_path_factory.mktemp("tiny-gguf") / "repo", model_dir=tiny_llama_dir
    )


@pytest.fixture(scope="session")
def tiny_embedding_gguf_repo(
    tiny_embedding_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``tiny_embedding_dir`` (the tiny BERT embedder) as a GGUF repo: ``tiny-bert-embed-F32.gguf``
    (architecture ``bert``, non-causal, ``bert.pooling_type`` mean), what ``convert_hf_to_gguf``
    makes of a sentence-transformers encoder. Built once per session."""
    from cortex.testing.tiny_gguf import build_tiny_embedding_gguf_repo

    return build_tiny_embedding_gguf_repo(
        tmp_path_factory.mktemp("tiny-bert-gguf") / "repo",
        kind="bert",
        model_dir=tiny_embedding_dir,
    )


@pytest.fixture(scope="session")
def tiny_llama_embedding_gguf_repo(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``tiny_llama_dir`` as a decoder embedding GGUF (``llama.pooling_type`` mean, the way
    Qwen3-Embedding-style GGUFs declare their pooling): ``tiny-llama-embed-F32.gguf``."""
    from cortex.testing.tiny_gguf import build_tiny_embedding_gguf_repo

    return build_tiny_embedding_gguf_repo(
        tmp_path_factory.mktemp("tiny-llama-embed-gguf") / "repo",
        kind="llama",
        model_dir=tiny_llama_dir,
    )
