"""SourceResolver: schemes from config + installed plugins, bare ids, unknown schemes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cortex.config import ConfigError, NeuronConfig, structure_config
from cortex.source import ModelIdError, UnknownSchemeError
from cortex.source_resolver import SourcePluginMissingError, SourceResolver


def neuron_config(data: dict[str, Any], base_dir: Path | None = None) -> NeuronConfig:
    config = structure_config(data, NeuronConfig, "neuron.toml")
    if base_dir is not None:
        import attrs

        config = attrs.evolve(config, base_dir=base_dir)
    return config


def test_installed_plugins_give_both_schemes(tmp_path: Path) -> None:
    resolver = SourceResolver.from_config(NeuronConfig())
    assert resolver.schemes == ["helexa", "huggingface"]
    by_scheme = {entry["scheme"]: entry for entry in resolver.describe()}
    assert by_scheme["helexa"]["endpoint"] == "https://registry.helexa.ai"
    assert by_scheme["huggingface"]["endpoint"] == "https://huggingface.co"
    assert by_scheme["helexa"]["cache_dir"] == str(tmp_path / "cortex-cache/sources/helexa")
    assert by_scheme["huggingface"]["cache_dir"] == str(tmp_path / "hf-cache")
    assert by_scheme["huggingface"]["default"] is True
    assert not any(entry["has_token"] for entry in resolver.describe())


def test_bare_ids_take_the_default_source() -> None:
    resolver = SourceResolver.from_config(NeuronConfig())
    model_id, source = resolver.resolve("acme/tiny")
    assert str(model_id) == "huggingface:acme/tiny"
    assert source.settings.scheme == "huggingface"
    helexa_default = SourceResolver.from_config(neuron_config({"default_source": "helexa"}))
    model_id, source = helexa_default.resolve("acme/tiny")
    assert str(model_id) == "helexa:acme/tiny"
    assert source.settings.endpoint == "https://registry.helexa.ai"
    model_id, source = helexa_default.resolve("huggingface:acme/tiny")
    assert source.settings.scheme == "huggingface"


def test_unknown_scheme_names_the_configured_schemes() -> None:
    resolver = SourceResolver.from_config(NeuronConfig())
    with pytest.raises(UnknownSchemeError) as caught:
        resolver.resolve("modelscope:acme/tiny")
    error = caught.value
    assert error.model_id == "modelscope:acme/tiny"
    assert "helexa" in error.message and "huggingface" in error.message
    assert error.to_json()["kind"] == "unknown_scheme"
    assert error.to_json()["configured_schemes"] == ["helexa", "huggingface"]


def test_malformed_ids_are_model_id_errors() -> None:
    resolver = SourceResolver.from_config(NeuronConfig())
    with pytest.raises(ModelIdError):
        resolver.resolve("huggingface:../../etc")


def test_mirror_is_served_by_the_huggingface_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("MIRROR_TOKEN", "mirror-secret")
    config = neuron_config(
        {
            "sources": {
                "mirror": {"plugin": "huggingface", "endpoint": "http://mirror.lan:8090"},
                "private": {
                    "plugin": "huggingface",
                    "endpoint": "http://private.lan",
                    "auth_env": "MIRROR_TOKEN",
                },
            }
        }
    )
    resolver = SourceResolver.from_config(config)
    by_scheme = {entry["scheme"]: entry for entry in resolver.describe()}
    # a mirror never inherits the Hugging Face token or cache
    assert by_scheme["mirror"]["has_token"] is False
    assert by_scheme["private"]["has_token"] is True
    assert by_scheme["huggingface"]["has_token"] is True
    assert by_scheme["mirror"]["cache_dir"] != by_scheme["huggingface"]["cache_dir"]
    _, source = resolver.resolve("mirror:acme/tiny")
    assert source.settings.endpoint == "http://mirror.lan:8090"
    assert "secret" not in repr(source)


def test_token_is_read_once_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELEXA_TOKEN", "first")
    resolver = SourceResolver.from_config(NeuronConfig())
    monkeypatch.delenv("HELEXA_TOKEN")
    _, source = resolver.resolve("helexa:acme/tiny")
    assert source.has_token


def test_a_scheme_whose_plugin_is_missing(tmp_path: Path) -> None:
    config = neuron_config(
        {"sources": {"modelscope": {"plugin": "modelscope", "endpoint": "https://ms.example"}}}
    )
    resolver = SourceResolver.from_config(config)  # the other schemes keep working
    resolver.resolve("helexa:acme/tiny")
    with pytest.raises(SourcePluginMissingError) as caught:
        resolver.resolve("modelscope:acme/tiny")
    assert "'modelscope'" in caught.value.message
    assert caught.value.to_json()["plugin"] == "modelscope"
    entry = next(e for e in resolver.describe() if e["scheme"] == "modelscope")
    assert entry["installed"] is False


def test_default_source_must_be_configured() -> None:
    with pytest.raises(ConfigError, match="default_source 'nowhere'"):
        SourceResolver.from_config(neuron_config({"default_source": "nowhere"}))


def test_shared_cache_dirs_are_refused(tmp_path: Path) -> None:
    shared = str(tmp_path / "shared")
    config = neuron_config(
        {"sources": {"helexa": {"cache_dir": shared}, "huggingface": {"cache_dir": shared}}}
    )
    with pytest.raises(ConfigError, match="share the cache dir"):
        SourceResolver.from_config(config)


def test_only_installed_plugins_when_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    from cortex.plugins import reset_registry

    monkeypatch.setenv("CORTEX_PLUGINS", "source-huggingface")
    reset_registry()
    resolver = SourceResolver.from_config(NeuronConfig())
    assert resolver.schemes == ["huggingface"]
    with pytest.raises(UnknownSchemeError, match="configured schemes: huggingface"):
        resolver.resolve("helexa:acme/tiny")
