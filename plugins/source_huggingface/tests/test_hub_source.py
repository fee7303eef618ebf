"""HubSource against a real registry on loopback: preflight errors, fetch, cache, resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cortex_source_huggingface.hub import HubSource

from cortex.harness_choice import choose_harness
from cortex.plugins import PluginRegistry
from cortex.source import (
    FetchError,
    ModelSourceId,
    NoLoadableWeightsError,
    QuantNotFoundError,
    RegistryUnreachableError,
    RepoNotFoundError,
    SourceSettings,
    UnauthorizedError,
    WeightFormat,
)
from cortex.testing.registry import publish_repo
from cortex.testing.servers import free_port
from cortex.wire.errors import ApiError

SCHEME = "mirror"
CONFIG = b'{"model_type": "llama"}'
WEIGHTS = bytes(range(256)) * 64  # 16 KiB


def make_source(tmp_path: Path, endpoint: str, auth_env: str | None = None) -> HubSource:
    return HubSource(
        SourceSettings(
            scheme=SCHEME,
            endpoint=endpoint,
            auth_env=auth_env,
            cache_dir=tmp_path / "cache",
            plugin="huggingface",
        )
    )


def mid(raw: str) -> ModelSourceId:
    return ModelSourceId.parse(raw)


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    publish_repo(
        root,
        "acme/dense",
        {"config.json": CONFIG, "tokenizer.json": b"{}", "model.safetensors": WEIGHTS},
    )
    publish_repo(
        root,
        "acme/quants",
        {"tiny.Q4_K_M.gguf": b"q4" * 500, "tiny.Q8_0.gguf": b"q8" * 900, "README.md": b"hi"},
    )
    publish_repo(root, "acme/empty", {"README.md": b"nothing here", "config.json": CONFIG})
    return root


# ---- preflight -------------------------------------------------------------------------------


def test_preflight_is_one_round_trip(repos: Path, hf_registry, tmp_path: Path) -> None:
    registry = hf_registry(repos)
    source = make_source(tmp_path, registry.url)
    preflight = source.preflight(mid("mirror:acme/dense"))
    assert preflight.model_id == "mirror:acme/dense"
    assert preflight.weight_format == WeightFormat.SAFETENSORS
    assert preflight.size_of("model.safetensors") == len(WEIGHTS)
    assert preflight.download_bytes == len(WEIGHTS) + len(CONFIG) + 2
    assert len(preflight.revision) == 40
    assert [(e.method, e.path) for e in registry.request_log.entries()] == [
        ("GET", "/api/models/acme/dense")
    ]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.safet*"))


def test_bare_id_is_qualified_with_the_configured_scheme(
    repos: Path, hf_registry, tmp_path: Path
) -> None:
    source = make_source(tmp_path, hf_registry(repos).url)
    assert source.preflight(mid("acme/dense")).model_id == "mirror:acme/dense"


def test_preflight_quant_upper_and_lower_case(repos: Path, hf_registry, tmp_path: Path) -> None:
    source = make_source(tmp_path, hf_registry(repos).url)
    for quant in ("q8_0", "Q8_0", "q8"):
        preflight = source.preflight(mid("mirror:acme/quants"), quant=quant)
        assert preflight.gguf_file == "tiny.Q8_0.gguf"
        assert preflight.download_bytes == 1800
    assert source.preflight(mid("mirror:acme/quants")).quants == ("Q4_K_M", "Q8_0")


def test_preflight_quant_not_found(repos: Path, hf_registry, tmp_path: Path) -> None:
    source = make_source(tmp_path, hf_registry(repos).url)
    with pytest.raises(QuantNotFoundError) as caught:
        source.preflight(mid("mirror:acme/quants"), quant="Q4_K_S")
    payload = json.loads(json.dumps(caught.value.to_json()))
    assert payload["kind"] == "quant_not_found"
    assert payload["model_id"] == "mirror:acme/quants"
    assert payload["available"] == ["Q4_K_M", "Q8_0"]
    assert payload["suggestion"] == "Q4_K_M"
    assert "did you mean 'Q4_K_M'?" in payload["message"]


def test_preflight_repo_not_found(repos: Path, hf_registry, tmp_path: Path) -> None:
    registry = hf_registry(repos)
    source = make_source(tmp_path, registry.url)
    with pytest.raises(RepoNotFoundError) as caught:
        source.preflight(mid("mirror:acme/missing"))
    payload = caught.value.to_json()
    assert payload["kind"] == "repo_not_found"
    assert payload["model_id"] == "mirror:acme/missing"
    assert registry.url in payload["message"]


def test_preflight_no_loadable_weights(repos: Path, hf_registry, tmp_path: Path) -> None:
    """A repo without weights by file name is described, not refused: whether some harness
    loads it is the neuron's one harness choice (cortex.harness_choice), which answers
    ``no_loadable_weights`` when none does."""
    source = make_source(tmp_path, hf_registry(repos).url)
    preflight = source.preflight(mid("mirror:acme/empty"))
    assert preflight.weight_format == WeightFormat.NONE
    assert preflight.file_names() == ["README.md", "config.json"]
    with pytest.raises(ApiError) as caught:
        choose_harness(PluginRegistry(allowed={"harness-torch"}).harnesses(), preflight)
    assert caught.value.status == 422
    assert caught.value.details is not None
    assert caught.value.details["kind"] == NoLoadableWeightsError.kind
    assert caught.value.details["model_id"] == "mirror:acme/empty"


def test_preflight_unauthorized(
    repos: Path, hf_registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = hf_registry(repos, token="right-token-123")
    no_token = make_source(tmp_path, registry.url, auth_env="MIRROR_TOKEN")
    with pytest.raises(UnauthorizedError) as missing:
        no_token.preflight(mid("mirror:acme/dense"))
    assert missing.value.to_json()["kind"] == "unauthorized"
    assert missing.value.model_id == "mirror:acme/dense"
    assert "$MIRROR_TOKEN" in missing.value.message
    monkeypatch.setenv("MIRROR_TOKEN", "wrong-token-456")
    wrong = make_source(tmp_path, registry.url, auth_env="MIRROR_TOKEN")
    with pytest.raises(UnauthorizedError) as rejected:
        wrong.preflight(mid("mirror:acme/dense"))
    assert "wrong-token-456" not in json.dumps(rejected.value.to_json())
    assert rejected.value.details["status"] == 403
    monkeypatch.setenv("MIRROR_TOKEN", "right-token-123")
    right = make_source(tmp_path, registry.url, auth_env="MIRROR_TOKEN")
    assert right.preflight(mid("mirror:acme/dense")).weight_format == WeightFormat.SAFETENSORS


def test_preflight_registry_unreachable(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    source = make_source(tmp_path, endpoint)
    with pytest.raises(RegistryUnreachableError) as caught:
        source.preflight(mid("mirror:acme/dense"))
    payload = caught.value.to_json()
    assert payload["kind"] == "registry_unreachable"
    assert payload["endpoint"] == endpoint
    assert endpoint in payload["message"]
    assert payload["model_id"] == "mirror:acme/dense"


# ---- fetch -----------------------------------------------------------------------------------


def test_fetch_only_the_files_asked_and_then_from_cache(
    repos: Path, hf_registry, tmp_path: Path
) -> None:
    registry = hf_registry(repos)
    source = make_source(tmp_path, registry.url)
    model = mid("mirror:acme/quants")
    preflight = source.preflight(model, quant="Q4_K_M")
    snapshot = source.fetch(model, [preflight.gguf_file])
    assert sorted(p.name for p in snapshot.iterdir()) == ["tiny.Q4_K_M.gguf"]
    assert (snapshot / "tiny.Q4_K_M.gguf").read_bytes() == b"q4" * 500
    assert snapshot.is_relative_to(tmp_path / "cache")
    downloaded = [e.path for e in registry.request_log.entries() if e.method == "GET"]
    assert not any("Q8_0" in path for path in downloaded)
    # a second fetch (and a fresh source: a restarted neuron) makes no request at all
    before = len(registry.request_log)
    assert source.fetch(model, [preflight.gguf_file]) == snapshot
    assert make_source(tmp_path, registry.url).fetch(model, [preflight.gguf_file]) == snapshot
    assert len(registry.request_log) == before


def test_fetch_picks_up_a_new_commit_after_preflight(
    repos: Path, hf_registry, tmp_path: Path
) -> None:
    registry = hf_registry(repos)
    source = make_source(tmp_path, registry.url)
    model = mid("mirror:acme/dense")
    first = source.fetch(model, ["config.json"])
    publish_repo(repos, "acme/dense", {"config.json": b'{"model_type": "qwen2"}'})
    preflight = source.preflight(model)
    second = source.fetch(model, ["config.json"])
    assert second.name == preflight.revision != first.name
    assert (second / "config.json").read_bytes() == b'{"model_type": "qwen2"}'
    assert (first / "config.json").read_bytes() == CONFIG


def test_progress_callback_and_log_lines(
    repos: Path, hf_registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source(tmp_path, hf_registry(repos).url)
    seen: list[tuple[str, int, int | None]] = []
    with caplog.at_level(logging.INFO, logger="cortex_source_huggingface"):
        source.fetch(
            mid("mirror:acme/dense"),
            ["config.json", "model.safetensors"],
            progress=lambda f, done, total: seen.append((f, done, total)),
        )
    assert ("model.safetensors", len(WEIGHTS), len(WEIGHTS)) in seen
    assert ("config.json", len(CONFIG), len(CONFIG)) in seen
    assert "fetching mirror:acme/dense: model.safetensors" in caplog.text  # not a terminal


def test_unsafe_file_names_are_refused(repos: Path, hf_registry, tmp_path: Path) -> None:
    source = make_source(tmp_path, hf_registry(repos).url)
    for name in ("../../etc/passwd", "/etc/passwd", "a\\b", "a//b"):
        with pytest.raises(FetchError, match="unsafe"):
            source.fetch(mid("mirror:acme/dense"), [name])
    with pytest.raises(FetchError, match="nothing to fetch"):
        source.fetch(mid("mirror:acme/dense"), [])


def test_fetch_of_a_missing_repo(repos: Path, hf_registry, tmp_path: Path) -> None:
    source = make_source(tmp_path, hf_registry(repos).url)
    with pytest.raises(RepoNotFoundError):
        source.fetch(mid("mirror:acme/missing"), ["config.json"])


def test_token_never_in_logs_or_errors(
    repos: Path,
    hf_registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "tok-DO-NOT-LEAK-42"
    registry = hf_registry(repos, token=token)
    monkeypatch.setenv("MIRROR_TOKEN", token)
    source = make_source(tmp_path, registry.url, auth_env="MIRROR_TOKEN")
    messages = []
    with caplog.at_level(logging.DEBUG):
        source.preflight(mid("mirror:acme/dense"))
        source.fetch(mid("mirror:acme/dense"), ["config.json", "model.safetensors"])
        for bad in ("mirror:acme/missing", "mirror:acme/quants"):  # not found; no quant Q1
            try:
                source.preflight(mid(bad), quant="Q1")
            except Exception as exc:
                messages.append(str(exc))
                messages.append(json.dumps(exc.to_json()))  # type: ignore[attr-defined]
    assert len(messages) == 4
    assert token not in caplog.text
    assert all(token not in m for m in messages)
    assert token not in repr(source)
    assert all(e.authorization == f"Bearer {token}" for e in registry.request_log.entries())


def test_a_repo_without_weights_that_a_harness_accepts(hf_registry, tmp_path: Path) -> None:
    """The built-in echo harness loads an ``echo.json``: such a repo is not an error."""
    publish_repo(tmp_path / "repos", "acme/echo", {"echo.json": b'{"reply": "hi"}'})
    source = make_source(tmp_path, hf_registry(tmp_path / "repos").url)
    preflight = source.preflight(mid("mirror:acme/echo"))
    assert preflight.weight_format == WeightFormat.NONE
    assert preflight.file_names() == ["echo.json"]
