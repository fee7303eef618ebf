"""``neuron pull`` as a real process against registries on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.testing.registry import publish_repo

PLUGINS = "source-huggingface,source-helexa,harness-torch,harness-llamacpp"


def run_pull(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORTEX_PLUGINS": PLUGINS}
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "neuron", "pull", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def setup(tmp_path: Path, hf_registry):
    root = tmp_path / "repos"
    publish_repo(
        root,
        "acme/gguf",
        {"tiny.Q4_K_M.gguf": b"4" * 300, "tiny.Q8_0.gguf": b"8" * 600, "README.md": b"x"},
    )
    publish_repo(
        root,
        "acme/dense",
        {
            "config.json": b'{"model_type": "llama"}',
            "tokenizer.json": b"{}",
            "model.safetensors": b"w" * 1000,
            "README.md": b"not needed",
        },
    )
    registry = hf_registry(root)
    config = tmp_path / "neuron.toml"
    config.write_text(
        f"""
default_source = "helexa"

[sources.helexa]
endpoint = "{registry.url}"
cache_dir = "helexa-cache"
"""
    )
    return registry, config, tmp_path


def test_pull_gguf_with_an_upper_case_quant(setup) -> None:
    registry, config, tmp_path = setup
    result = run_pull("helexa:acme/gguf", "--quant", "Q8_0", "--json", config=config)
    assert result.returncode == 0, result.stderr
    pulled = json.loads(result.stdout)
    assert pulled["model_id"] == "helexa:acme/gguf"
    assert pulled["harness"] == "llamacpp"
    assert pulled["gguf_file"] == "tiny.Q8_0.gguf"
    assert 0 <= pulled["fetch_seconds"] < 60
    assert [f["path"] for f in pulled["files"]] == ["tiny.Q8_0.gguf"]
    local = Path(pulled["files"][0]["local_path"])
    assert local.read_bytes() == b"8" * 600
    assert local.is_relative_to(tmp_path / "helexa-cache")
    gets = [e.path for e in registry.request_log.entries() if e.method == "GET"]
    assert not any("Q4_K_M" in p or "README" in p for p in gets)


def test_pull_dense_bare_id_prints_where_the_files_are(setup) -> None:
    registry, config, _ = setup
    result = run_pull("acme/dense", config=config)
    assert result.returncode == 0, result.stderr
    assert "pulled helexa:acme/dense for harness torch" in result.stdout
    snapshot = Path(result.stdout.split("snapshot: ")[1].splitlines()[0])
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    # warm: a second pull with the registry gone is served from the cache
    registry.stop()
    again = run_pull("acme/dense", config=config)
    assert again.returncode == 0, again.stderr
    assert f"snapshot: {snapshot}" in again.stdout


def test_pull_errors_are_typed(setup) -> None:
    _, config, _ = setup
    missing_quant = run_pull("helexa:acme/gguf", "--quant", "q5_k_m", "--json", config=config)
    assert missing_quant.returncode == 1
    error = json.loads(missing_quant.stdout)["error"]
    assert error["kind"] == "quant_not_found"
    assert error["model_id"] == "helexa:acme/gguf"
    assert error["available"] == ["Q4_K_M", "Q8_0"]
    assert error["suggestion"] in ("Q4_K_M", "Q8_0")
    unknown = run_pull("nowhere:acme/gguf", config=config)
    assert unknown.returncode == 1
    assert "configured schemes: helexa, huggingface" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    bad_harness = run_pull("helexa:acme/gguf", "--harness", "torch", config=config)
    assert bad_harness.returncode == 1
    assert "harness 'torch' cannot load helexa:acme/gguf" in bad_harness.stderr
    bad_id = run_pull("helexa:../x", config=config)
    assert bad_id.returncode == 2
    assert "Traceback" not in bad_id.stderr
    # Ids the registry cannot express (issue 22): refused before any request, exit 2, its kind.
    for raw in ("huggingface:0/{", "helexa:acme/a/b", "acme/echo@main", "acme/x--y"):
        refused = run_pull(raw, "--json", config=config)
        assert refused.returncode == 2, (raw, refused.stdout, refused.stderr)
        kind = json.loads(refused.stdout)["error"]["kind"]
        assert kind in ("invalid_repo_name", "name_contains_slash"), (raw, kind)
