"""Configuration: strict structuring, error messages, effective sources, example files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.config import (
    ConfigError,
    Duration,
    NeuronConfig,
    SourceSection,
    effective_sources,
    load_cortex_config,
    load_models_config,
    load_neuron_config,
    parse_listen,
)
from cortex.source import SourceDefaults

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults() -> None:
    cortex = load_cortex_config(None)
    assert cortex.gateway.listen == "0.0.0.0:31313"
    assert cortex.gateway.metrics_listen == "127.0.0.1:31314"  # loopback: docs/security.md
    assert cortex.eviction.strategy == "lru"
    assert cortex.eviction.defrag_after_cycles == 50
    neuron = load_neuron_config(None)
    assert neuron.listen == "0.0.0.0:13131"
    assert neuron.default_source == "huggingface"


def test_models_config_relative_to_file(tmp_path: Path) -> None:
    path = write(tmp_path, "cortex.toml", 'models_config = "m.toml"\n')
    assert load_cortex_config(path).models_config_path == tmp_path / "m.toml"


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, "cortex.toml", "[gateway]\nlisten = '1.2.3.4:5'\nlisen = 'x'\n")
    with pytest.raises(ConfigError) as excinfo:
        load_cortex_config(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "gateway.lisen" in message
    assert "unknown key" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "neuron.toml", "defualt_source = 'x'\n")
    with pytest.raises(ConfigError, match=r"defualt_source: unknown key"):
        load_neuron_config(path)


def test_wrong_type_names_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, "cortex.toml", "[eviction]\ndefrag_after_cycles = 'often'\n")
    with pytest.raises(ConfigError) as excinfo:
        load_cortex_config(path)
    message = str(excinfo.value)
    assert "eviction.defrag_after_cycles" in message
    assert "expected an integer" in message


def test_wrong_type_in_list_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models.toml",
        "[[models]]\nid = 'a/b'\n\n[[models]]\nid = 'c/d'\npinned = 'yes'\n",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_models_config(path)
    message = str(excinfo.value)
    assert "models[1].pinned" in message
    assert "expected true or false" in message


def test_bad_model_id_in_profile(tmp_path: Path) -> None:
    path = write(tmp_path, "models.toml", "[[models]]\nid = 'no-slash'\n")
    with pytest.raises(ConfigError, match=r"models\[0\].*no-slash"):
        load_models_config(path)


def test_bad_alias_target(tmp_path: Path) -> None:
    path = write(tmp_path, "models.toml", "[aliases]\nq = '../x'\n")
    with pytest.raises(ConfigError, match=r"alias 'q'"):
        load_models_config(path)


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "cortex.toml", "[[neurons]]\nname = 'a'\n")
    with pytest.raises(ConfigError, match=r"neurons\[0\]"):
        load_cortex_config(path)


def test_bad_listen(tmp_path: Path) -> None:
    path = write(tmp_path, "neuron.toml", "listen = 'nowhere'\n")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_neuron_config(path)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "cortex.toml", "[gateway\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_cortex_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_cortex_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10m", 600.0), ("1h30m", 5400.0), ("45s", 45.0), (30, 30.0), (-1, None), ("never", None)],
)
def test_durations(value: object, seconds: float | None) -> None:
    assert Duration.parse(value).seconds == seconds


@pytest.mark.parametrize("value", ["10 minutes", "", "m10", -5, True, "1h30"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        Duration.parse(value)


def test_keep_alive_error_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "models.toml", "[[models]]\nid = 'a/b'\nkeep_alive = 'soon'\n")
    with pytest.raises(ConfigError, match=r"models\[0\].keep_alive"):
        load_models_config(path)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ValueError):
        parse_listen("host:99999")


# ---- effective sources ---------------------------------------------------------------------

HELEXA_DEFAULTS = {
    "helexa": (
        "helexa",
        SourceDefaults("https://registry.helexa.ai", "HELEXA_TOKEN", Path("/c/helexa")),
    )
}


def test_legacy_hf_cache_carried_through() -> None:
    sources = effective_sources(NeuronConfig(hf_cache="/legacy/hf"), environ={})
    hf = sources["huggingface"]
    assert hf.cache_dir == Path("/legacy/hf")
    assert hf.endpoint == "https://huggingface.co"
    assert hf.auth_env == "HF_TOKEN"


def test_explicit_huggingface_entry_preserved() -> None:
    config = NeuronConfig(
        hf_cache="/legacy/hf",
        sources={
            "huggingface": SourceSection(
                endpoint="http://mirror:1/", auth_env="MY_TOKEN", cache_dir="/explicit"
            )
        },
    )
    hf = effective_sources(config, environ={"HF_HUB_CACHE": "/env"})["huggingface"]
    assert (hf.endpoint, hf.auth_env, hf.cache_dir) == (
        "http://mirror:1",
        "MY_TOKEN",
        Path("/explicit"),
    )


def test_helexa_alongside_huggingface() -> None:
    sources = effective_sources(NeuronConfig(), HELEXA_DEFAULTS, environ={"HF_HOME": "/hfhome"})
    assert set(sources) == {"huggingface", "helexa"}
    assert sources["helexa"].endpoint == "https://registry.helexa.ai"
    assert sources["helexa"].auth_env == "HELEXA_TOKEN"
    assert sources["helexa"].cache_dir == Path("/c/helexa")
    assert sources["huggingface"].cache_dir == Path("/hfhome/hub")


def test_explicit_helexa_overrides_defaults_field_by_field() -> None:
    config = NeuronConfig(sources={"helexa": SourceSection(endpoint="http://eu:9")})
    helexa = effective_sources(config, HELEXA_DEFAULTS, environ={})["helexa"]
    assert helexa.endpoint == "http://eu:9"
    assert helexa.auth_env == "HELEXA_TOKEN"
    assert helexa.cache_dir == Path("/c/helexa")


def test_env_fallback_chain_only_for_huggingface() -> None:
    environ = {"HF_HUB_CACHE": "/hub-cache", "HF_HOME": "/hf-home", "CORTEX_CACHE": "/cx"}
    config = NeuronConfig(
        sources={"mirror": SourceSection(plugin="huggingface", endpoint="http://m:1")}
    )
    sources = effective_sources(config, environ=environ)
    assert sources["huggingface"].cache_dir == Path("/hub-cache")
    assert sources["mirror"].cache_dir == Path("/cx/sources/mirror")
    assert sources["mirror"].plugin == "huggingface"
    only_home = effective_sources(NeuronConfig(), environ={"HF_HOME": "/hf-home"})
    assert only_home["huggingface"].cache_dir == Path("/hf-home/hub")


def test_default_source_fallback() -> None:
    assert load_neuron_config(None).default_source == "huggingface"


def test_scheme_without_endpoint_is_an_error() -> None:
    config = NeuronConfig(sources={"private": SourceSection(plugin="huggingface")})
    with pytest.raises(ConfigError, match=r"\[sources.private\] needs an 'endpoint'"):
        effective_sources(config, environ={})


def test_shared_cache_dir_is_refused() -> None:
    config = NeuronConfig(
        hf_cache="/same",
        sources={"helexa": SourceSection(cache_dir="/same")},
    )
    with pytest.raises(ConfigError, match="share the cache dir"):
        effective_sources(config, HELEXA_DEFAULTS, environ={})


# ---- example files --------------------------------------------------------------------------


def test_example_configs_load() -> None:
    cortex = load_cortex_config(ROOT / "cortex.example.toml")
    assert [n.name for n in cortex.neurons] == ["big", "small"]
    models = load_models_config(cortex.models_config_path)
    assert models.aliases["qwen"] == "huggingface:Qwen/Qwen3-8B"
    assert any(m.pinned for m in models.models)
    neuron = load_neuron_config(ROOT / "neuron.example.toml")
    assert neuron.devices["cpu"].memory_mb == 8192
