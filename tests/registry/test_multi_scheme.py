"""Two registries on loopback, one per scheme: routing, separate caches, token isolation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import attrs
import pytest

from cortex.config import NeuronConfig, SourceSection
from cortex.source import RepoNotFoundError, UnauthorizedError, UnknownSchemeError
from cortex.source_resolver import SourceResolver
from cortex.testing.registry import RunningRegistry, publish_repo

HF_BYTES = b"weights from the hugging face registry" * 10
HELEXA_BYTES = b"weights from the helexa registry, different" * 10
HF_TOKEN = "hf_tok_ONLY_FOR_HF_111"
HELEXA_TOKEN = "hx_tok_ONLY_FOR_HELEXA_222"


@attrs.frozen
class Fleet:
    hf: RunningRegistry
    helexa: RunningRegistry
    resolver: SourceResolver


@pytest.fixture
def fleet(tmp_path: Path, hf_registry, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    """The same org/name, different bytes, on two registries that each require their token."""
    publish_repo(
        tmp_path / "hf",
        "acme/tiny",
        {"config.json": b'{"from": "hf"}', "model.safetensors": HF_BYTES},
    )
    publish_repo(
        tmp_path / "helexa",
        "acme/tiny",
        {"config.json": b'{"from": "helexa"}', "model.safetensors": HELEXA_BYTES},
    )
    hf = hf_registry(tmp_path / "hf", token=HF_TOKEN)
    helexa = hf_registry(tmp_path / "helexa", token=HELEXA_TOKEN)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("HELEXA_TOKEN", HELEXA_TOKEN)
    config = NeuronConfig(
        sources={
            "huggingface": SourceSection(endpoint=hf.url),
            "helexa": SourceSection(endpoint=helexa.url),
        }
    )
    return Fleet(hf, helexa, SourceResolver.from_config(config))


def test_each_scheme_goes_to_its_own_endpoint_and_cache(fleet: Fleet, tmp_path: Path) -> None:
    hf_id, hf_source = fleet.resolver.resolve("huggingface:acme/tiny")
    hx_id, hx_source = fleet.resolver.resolve("helexa:acme/tiny")
    hf_pre = hf_source.preflight(hf_id)
    hx_pre = hx_source.preflight(hx_id)
    assert hf_pre.revision != hx_pre.revision
    hf_snap = hf_source.fetch(hf_id, ["config.json", "model.safetensors"])
    hx_snap = hx_source.fetch(hx_id, ["config.json", "model.safetensors"])
    assert hf_snap.is_relative_to(tmp_path / "hf-cache")
    assert hx_snap.is_relative_to(tmp_path / "cortex-cache" / "sources" / "helexa")
    assert (hf_snap / "model.safetensors").read_bytes() == HF_BYTES
    assert (hx_snap / "model.safetensors").read_bytes() == HELEXA_BYTES
    # fetching one again never overwrites the other
    hf_source.fetch(hf_id, ["config.json", "model.safetensors"])
    assert (hx_snap / "model.safetensors").read_bytes() == HELEXA_BYTES
    assert (hf_snap / "config.json").read_bytes() == b'{"from": "hf"}'
    # and each registry saw only requests for its own scheme
    assert fleet.hf.request_log.entries() and fleet.helexa.request_log.entries()


def test_a_token_is_never_sent_to_another_sources_endpoint(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        for raw in ("huggingface:acme/tiny", "helexa:acme/tiny", "acme/tiny"):
            model_id, source = fleet.resolver.resolve(raw)
            source.preflight(model_id)
            source.fetch(model_id, ["config.json", "model.safetensors"])
    hf_auth = {e.authorization for e in fleet.hf.request_log.entries()}
    hx_auth = {e.authorization for e in fleet.helexa.request_log.entries()}
    assert hf_auth == {f"Bearer {HF_TOKEN}"}
    assert hx_auth == {f"Bearer {HELEXA_TOKEN}"}
    assert HF_TOKEN not in caplog.text and HELEXA_TOKEN not in caplog.text
    assert "secret" not in json.dumps(fleet.resolver.describe())
    assert HF_TOKEN not in json.dumps(fleet.resolver.describe())


def test_mirror_without_auth_env_sends_no_token(fleet: Fleet, tmp_path: Path, hf_registry) -> None:
    publish_repo(tmp_path / "mirror", "acme/tiny", {"model.safetensors": b"mirror"})
    mirror = hf_registry(tmp_path / "mirror")
    config = NeuronConfig(
        sources={
            "huggingface": SourceSection(endpoint=fleet.hf.url),
            "mirror": SourceSection(endpoint=mirror.url, plugin="huggingface"),
        }
    )
    resolver = SourceResolver.from_config(config)
    model_id, source = resolver.resolve("mirror:acme/tiny")
    snapshot = source.fetch(model_id, ["model.safetensors"])
    assert (snapshot / "model.safetensors").read_bytes() == b"mirror"
    assert {e.authorization for e in mirror.request_log.entries()} == {None}


def test_errors_carry_the_id_as_configured(fleet: Fleet, monkeypatch) -> None:
    model_id, source = fleet.resolver.resolve("helexa:acme/nope")
    with pytest.raises(RepoNotFoundError) as caught:
        source.preflight(model_id)
    assert caught.value.model_id == "helexa:acme/nope"
    monkeypatch.delenv("HELEXA_TOKEN")
    config = NeuronConfig(sources={"helexa": SourceSection(endpoint=fleet.helexa.url)})
    model_id, source = SourceResolver.from_config(config).resolve("helexa:acme/tiny")
    with pytest.raises(UnauthorizedError, match=r"\$HELEXA_TOKEN") as denied:
        source.preflight(model_id)
    assert denied.value.to_json()["model_id"] == "helexa:acme/tiny"


def test_unknown_scheme_and_bare_default(fleet: Fleet) -> None:
    with pytest.raises(UnknownSchemeError, match="configured schemes: helexa, huggingface"):
        fleet.resolver.resolve("modelhub:acme/tiny")
    model_id, source = fleet.resolver.resolve("acme/tiny")
    assert str(model_id) == "huggingface:acme/tiny"
    assert source.settings.endpoint == fleet.hf.url
