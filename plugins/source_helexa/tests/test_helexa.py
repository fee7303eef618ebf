"""The helexa plugin: its defaults, its own cache, and ids that work only when it is installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from cortex_source_helexa.plugin import HelexaSourcePlugin

from cortex.config import ConfigError, NeuronConfig, SourceSection
from cortex.plugins import reset_registry
from cortex.source import UnknownSchemeError
from cortex.source_resolver import SourceResolver
from cortex.testing.registry import publish_repo


def test_defaults(tmp_path: Path) -> None:
    defaults = HelexaSourcePlugin().defaults("helexa")
    assert defaults.endpoint == "https://registry.helexa.ai"
    assert defaults.auth_env == "HELEXA_TOKEN"
    assert defaults.cache_dir == tmp_path / "cortex-cache" / "sources" / "helexa"


def test_helexa_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELEXA_CACHE", str(tmp_path / "hx"))
    assert HelexaSourcePlugin().defaults("helexa").cache_dir == tmp_path / "hx"


def test_cache_never_coincides_with_the_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = SourceResolver.from_config(NeuronConfig())
    caches = {e["scheme"]: e["cache_dir"] for e in resolver.describe()}
    assert caches["helexa"] != caches["huggingface"]
    # an operator who points both at one folder is stopped before anything is downloaded
    monkeypatch.setenv("HELEXA_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ConfigError, match="share the cache dir"):
        SourceResolver.from_config(NeuronConfig())


def test_helexa_ids_need_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_PLUGINS", "source-huggingface")
    reset_registry()
    resolver = SourceResolver.from_config(NeuronConfig())
    with pytest.raises(UnknownSchemeError) as caught:
        resolver.resolve("helexa:acme/tiny")
    assert "configured schemes: huggingface" in caught.value.message
    monkeypatch.setenv("CORTEX_PLUGINS", "source-huggingface,source-helexa")
    reset_registry()
    _, source = SourceResolver.from_config(NeuronConfig()).resolve("helexa:acme/tiny")
    assert source.settings.endpoint == "https://registry.helexa.ai"


def test_fetch_through_helexa_uses_its_token_and_cache(
    tmp_path: Path, hf_registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_repo(tmp_path / "repos", "acme/tiny", {"model.safetensors": b"helexa bytes"})
    registry = hf_registry(tmp_path / "repos", token="hx-token")
    monkeypatch.setenv("HELEXA_TOKEN", "hx-token")
    monkeypatch.setenv("HF_TOKEN", "hf-token-must-not-travel")
    config = NeuronConfig(sources={"helexa": SourceSection(endpoint=registry.url)})
    model_id, source = SourceResolver.from_config(config).resolve("helexa:acme/tiny")
    assert source.preflight(model_id).model_id == "helexa:acme/tiny"
    snapshot = source.fetch(model_id, ["model.safetensors"])
    assert snapshot.is_relative_to(tmp_path / "cortex-cache" / "sources" / "helexa")
    assert (snapshot / "model.safetensors").read_bytes() == b"helexa bytes"
    assert {e.authorization for e in registry.request_log.entries()} == {"Bearer hx-token"}
