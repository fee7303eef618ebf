"""The ``local`` source end to end: installed entry point -> neuron.toml -> effective sources ->
preflight and fetch against a real directory tree, including the ways a store can go wrong."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from cortex_source_local.source import LocalSource, StoreEndpointError, store_root

from cortex.config import effective_sources, load_neuron_config
from cortex.harness_choice import choose_harness
from cortex.plugins import PluginRegistry
from cortex.source import (
    FetchError,
    ModelIdError,
    ModelSourceId,
    NoLoadableWeightsError,
    QuantNotFoundError,
    RegistryUnreachableError,
    RepoNotFoundError,
    SourceSettings,
    UnauthorizedError,
    WeightFormat,
)
from cortex.wire.errors import ApiError

SAFETENSORS_REPO = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b"{}",
    "model.safetensors": b"\0" * 1000,
    ".cache/huggingface/download/model.safetensors.metadata": b"x",
    ".gitattributes": b"*.safetensors filter=lfs",
}
GGUF_REPO = {
    "tiny.Q8_0.gguf": b"G" * 800,
    "tiny.Q4_K_M.gguf": b"G" * 400,
    "tiny-F16-00001-of-00002.gguf": b"G" * 300,
    "tiny-F16-00002-of-00002.gguf": b"G" * 300,
}


def write_repo(root: Path, repo_path: str, files: dict[str, bytes]) -> Path:
    repo = root / repo_path
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    return repo


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_repo(root, "acme/tiny-chat", SAFETENSORS_REPO)
    write_repo(root, "acme/tiny-gguf", GGUF_REPO)
    write_repo(root, "acme/nested/deep", SAFETENSORS_REPO)
    write_repo(root, "acme/no-weights", {"pytorch_model.bin": b"x", "config.json": b"{}"})
    return root


def configured_sources(tmp_path: Path, toml: str) -> dict[str, LocalSource]:
    """What a neuron does at start: read neuron.toml, ask every installed source plugin for its
    defaults, and create one source per scheme served by this plugin."""
    config_path = tmp_path / "neuron.toml"
    config_path.write_text(toml)
    config = load_neuron_config(config_path)
    plugins = {p.name: p for p in PluginRegistry(allowed={"source-local"}).source_plugins()}
    defaults = {
        scheme: (p.name, p.defaults(scheme)) for p in plugins.values() for scheme in p.schemes
    }
    settings = effective_sources(config, defaults, environ={"CORTEX_CACHE": str(tmp_path / "c")})
    return {
        scheme: plugins[s.plugin].create(s) for scheme, s in settings.items() if s.plugin in plugins
    }


@pytest.fixture
def local(tmp_path: Path, store: Path) -> LocalSource:
    return configured_sources(tmp_path, f'[sources.local]\nendpoint = "file://{store}"\n')["local"]


def test_plugin_is_found_through_its_entry_point_with_defaults() -> None:
    plugins = {p.name: p for p in PluginRegistry(allowed={"source-local"}).source_plugins()}
    assert plugins["local"].schemes == ("local",)
    defaults = plugins["local"].defaults("local")
    assert defaults.endpoint == "file:///srv/models"
    assert defaults.auth_env is None


def test_preflight_safetensors_repo(local: LocalSource) -> None:
    preflight = local.preflight(ModelSourceId.parse("local:acme/tiny-chat"))
    assert preflight.model_id == "local:acme/tiny-chat"
    assert preflight.weight_format == WeightFormat.SAFETENSORS
    assert preflight.file_names() == ["config.json", "model.safetensors", "tokenizer.json"]
    assert preflight.size_of("model.safetensors") == 1000
    assert re.fullmatch(r"[0-9a-f]{40}", preflight.revision)
    assert preflight.gguf_file is None and preflight.quants == ()
    assert preflight.download_bytes == 0
    assert local.has_token is False


def test_bare_id_and_nested_name_refused(local: LocalSource) -> None:
    preflight = local.preflight(ModelSourceId.parse("acme/tiny-chat"))
    assert preflight.model_id == "local:acme/tiny-chat"
    assert preflight.weight_format == WeightFormat.SAFETENSORS
    # Ids are 'org/name' for every source (the HF repo grammar): a nested folder is not an id.
    with pytest.raises(ModelIdError):
        ModelSourceId.parse("acme/nested/deep")


def test_preflight_gguf_default_requested_and_missing_quant(local: LocalSource) -> None:
    model = ModelSourceId.parse("local:acme/tiny-gguf")
    default = local.preflight(model)
    assert default.weight_format == WeightFormat.GGUF
    assert default.quants == ("F16", "Q4_K_M", "Q8_0")
    assert default.gguf_file == "tiny.Q4_K_M.gguf"
    assert local.preflight(model, quant="q8_0").gguf_file == "tiny.Q8_0.gguf"
    assert local.preflight(model, quant="F16").gguf_file == "tiny-F16-00001-of-00002.gguf"
    with pytest.raises(QuantNotFoundError) as caught:
        local.preflight(model, quant="Q2_K")
    payload = caught.value.to_json()
    assert payload["kind"] == "quant_not_found"
    assert payload["model_id"] == "local:acme/tiny-gguf"
    assert payload["available"] == ["F16", "Q4_K_M", "Q8_0"]
    assert payload["requested"] == "Q2_K"
    assert caught.value.http_status == 422


def test_missing_repo_and_repo_without_weights_are_typed(local: LocalSource) -> None:
    with pytest.raises(RepoNotFoundError) as missing:
        local.preflight(ModelSourceId.parse("local:acme/nope"))
    assert missing.value.to_json()["model_id"] == "local:acme/nope"
    assert missing.value.http_status == 404
    # described, not refused: which harness loads it is the neuron's question
    described = local.preflight(ModelSourceId.parse("local:acme/no-weights"))
    assert described.weight_format == WeightFormat.NONE
    with pytest.raises(ApiError) as no_weights:
        choose_harness(PluginRegistry(allowed=set()).harnesses(), described)
    assert no_weights.value.code == NoLoadableWeightsError.kind
    assert no_weights.value.details is not None
    assert "pytorch_model.bin" in no_weights.value.details["files"]
    json.dumps(no_weights.value.details)


def test_unmounted_store_is_unreachable(tmp_path: Path) -> None:
    sources = configured_sources(
        tmp_path, f'[sources.local]\nendpoint = "file://{tmp_path}/not-mounted"\n'
    )
    with pytest.raises(RegistryUnreachableError) as caught:
        sources["local"].preflight(ModelSourceId.parse("local:acme/tiny-chat"))
    assert "is it mounted" in caught.value.message
    assert caught.value.http_status == 503


def test_a_second_store_under_its_own_scheme(tmp_path: Path, store: Path) -> None:
    sources = configured_sources(
        tmp_path,
        f'[sources.local]\nendpoint = "file://{store}"\n'
        f'[sources.nfs]\nplugin = "local"\nendpoint = "{tmp_path}/nfs"\n',
    )
    write_repo(tmp_path / "nfs", "team/model", {"model.safetensors": b"1"})
    assert set(sources) == {"local", "nfs"}
    assert sources["nfs"].preflight(ModelSourceId.parse("nfs:team/model")).model_id == (
        "nfs:team/model"
    )
    with pytest.raises(RepoNotFoundError) as caught:
        sources["nfs"].preflight(ModelSourceId.parse("nfs:acme/tiny-chat"))
    assert caught.value.model_id == "nfs:acme/tiny-chat"


def test_fetch_returns_the_repo_itself_without_copying(local: LocalSource, store: Path) -> None:
    model = ModelSourceId.parse("local:acme/tiny-chat")
    seen: list[tuple[str, int, int | None]] = []
    snapshot = local.fetch(
        model, ["config.json", "model.safetensors"], lambda *args: seen.append(args)
    )
    assert snapshot == (store / "acme/tiny-chat").resolve()
    assert (snapshot / "model.safetensors").stat().st_ino == (
        (store / "acme/tiny-chat/model.safetensors").stat().st_ino
    )
    assert seen == [("config.json", 23, 23), ("model.safetensors", 1000, 1000)]
    with pytest.raises(FetchError) as caught:
        local.fetch(model, ["model.safetensors", "generation_config.json"])
    assert caught.value.to_json()["missing"] == ["generation_config.json"]


def test_symlinks_never_lead_outside_the_store(
    local: LocalSource, store: Path, tmp_path: Path
) -> None:
    outside = write_repo(tmp_path, "outside/secret", {"model.safetensors": b"secret"})
    (store / "evil").mkdir()
    (store / "evil" / "repo").symlink_to(outside)
    with pytest.raises(RepoNotFoundError, match="outside the model store"):
        local.preflight(ModelSourceId.parse("local:evil/repo"))

    leaky = store / "acme" / "tiny-chat" / "leak.safetensors"
    leaky.symlink_to(outside / "model.safetensors")
    names = local.preflight(ModelSourceId.parse("local:acme/tiny-chat")).file_names()
    assert "leak.safetensors" not in names
    with pytest.raises(FetchError, match="outside the model store"):
        local.fetch(ModelSourceId.parse("local:acme/tiny-chat"), ["leak.safetensors"])
    with pytest.raises(FetchError, match="outside the model store"):
        local.fetch(ModelSourceId.parse("local:acme/tiny-chat"), ["../../../outside/x"])

    # Ids are validated on parse; an id built by hand is still checked after resolve().
    forged = ModelSourceId(scheme="local", org="..", name="outside/secret")
    with pytest.raises(RepoNotFoundError, match="outside the model store"):
        local.preflight(forged)

    # A symlink that stays inside the store is fine (e.g. an alias directory).
    (store / "alias").mkdir()
    (store / "alias" / "chat").symlink_to(store / "acme" / "tiny-chat")
    assert local.preflight(ModelSourceId.parse("local:alias/chat")).weight_format == "safetensors"


def test_revision_changes_when_a_file_changes(local: LocalSource, store: Path) -> None:
    model = ModelSourceId.parse("local:acme/tiny-chat")
    before = local.preflight(model).revision
    assert local.preflight(model).revision == before
    assert local.fetch(model, ["model.safetensors"], revision=before).is_dir()
    (store / "acme/tiny-chat/model.safetensors").write_bytes(b"\1" * 1001)
    after = local.preflight(model).revision
    assert after != before
    with pytest.raises(FetchError, match="changed on disk since preflight") as caught:
        local.fetch(model, ["model.safetensors"], revision=before)
    assert caught.value.to_json()["current"] == after
    assert local.fetch(model, ["model.safetensors"], revision=after).is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: permissions cannot fail")
def test_unreadable_repo_is_unauthorized(local: LocalSource, store: Path) -> None:
    repo = store / "acme" / "tiny-chat"
    (repo / "model.safetensors").chmod(0)
    try:
        with pytest.raises(UnauthorizedError):
            local.fetch(ModelSourceId.parse("local:acme/tiny-chat"), ["model.safetensors"])
    finally:
        (repo / "model.safetensors").chmod(0o644)


@pytest.mark.parametrize(
    ("endpoint", "root"),
    [
        ("file:///srv/models", "/srv/models"),
        ("file://localhost/srv/my%20models", "/srv/my models"),
        ("/mnt/nfs/models", "/mnt/nfs/models"),
    ],
)
def test_store_root_accepts_file_urls_and_absolute_paths(endpoint: str, root: str) -> None:
    assert store_root(endpoint) == Path(root)


@pytest.mark.parametrize("endpoint", ["models", "file://nas/models", "file:relative/path"])
def test_store_root_refuses_what_is_not_a_local_absolute_path(endpoint: str) -> None:
    with pytest.raises(StoreEndpointError):
        LocalSource(
            SourceSettings(
                scheme="local", endpoint=endpoint, auth_env=None, cache_dir=Path("/c"), plugin="l"
            )
        )
