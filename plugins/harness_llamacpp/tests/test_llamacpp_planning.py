"""What the harness decides before anything is downloaded or loaded: which repos it accepts, which
files a fetch needs, how much memory a load takes, which local file a load opens, its settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cortex_harness_llamacpp import gguf_files
from cortex_harness_llamacpp.harness import (
    LlamaCppHarness,
    choose_local_gguf,
    estimated_kv_bytes_per_token,
    resolve_context_length,
)
from cortex_harness_llamacpp.settings import LlamaCppSettings, resolve_settings

from cortex.harness import HarnessError, LoadOptions
from cortex.source import Preflight, RepoFile, WeightFormat

GIB = 2**30


def preflight(files: dict[str, int], gguf_file: str | None, fmt: str = WeightFormat.GGUF):
    return Preflight(
        model_id="huggingface:acme/model-GGUF",
        revision="0" * 40,
        weight_format=fmt,
        files=tuple(RepoFile(path, size) for path, size in files.items()),
        gguf_file=gguf_file,
    )


SPLIT = {
    "README.md": 1000,
    "model-Q4_K_M.gguf": 5 * GIB,
    "model-Q8_0-00001-of-00002.gguf": 4 * GIB,
    "model-Q8_0-00002-of-00002.gguf": 4 * GIB,
    "mmproj-model-f16.gguf": GIB,
}


def test_accepts_gguf_repos_only() -> None:
    harness = LlamaCppHarness()
    assert harness.accepts(preflight(SPLIT, "model-Q4_K_M.gguf"))
    assert harness.accepts(preflight({**SPLIT, "model.safetensors": 1}, None, WeightFormat.BOTH))
    assert not harness.accepts(preflight({"model.safetensors": 1}, None, WeightFormat.SAFETENSORS))
    assert not harness.accepts(preflight({"mmproj-x.gguf": 1}, None))


def test_files_needed_is_only_the_chosen_quant() -> None:
    harness = LlamaCppHarness()
    assert harness.files_needed(preflight(SPLIT, "model-Q4_K_M.gguf")) == ["model-Q4_K_M.gguf"]
    assert harness.files_needed(preflight(SPLIT, "model-Q8_0-00001-of-00002.gguf")) == [
        "model-Q8_0-00001-of-00002.gguf",
        "model-Q8_0-00002-of-00002.gguf",
    ]
    assert harness.files_needed(preflight(SPLIT, None)) == []


def test_memory_estimate_is_file_size_plus_kv_cache_for_the_capacity() -> None:
    harness = LlamaCppHarness()
    q4 = preflight(SPLIT, "model-Q4_K_M.gguf")
    per_token = estimated_kv_bytes_per_token(5 * GIB)
    # the KV cache holds kv_tokens cells (at least one context)
    short = harness.estimate_memory(q4, LoadOptions(context_length=1024, kv_tokens=1024))
    long = harness.estimate_memory(q4, LoadOptions(context_length=1024, kv_tokens=9216))
    assert long - short == 8192 * per_token
    assert 5 * GIB + 1024 * per_token < short < 5.2 * GIB + 1024 * per_token
    assert harness.estimate_memory(
        q4, LoadOptions(context_length=4096, kv_tokens=1024)
    ) == harness.estimate_memory(q4, LoadOptions(context_length=4096, kv_tokens=4096))
    # by default: max_batch (32) x 1024 cells
    default = harness.estimate_memory(q4, LoadOptions(context_length=1024))
    assert default - short == (32 * 1024 - 1024) * per_token
    # Llama-3-8B Q4_K_M (4.9 GB) really needs 128 KiB of F16 KV cache per token.
    assert 100_000 < estimated_kv_bytes_per_token(4_900_000_000) < 140_000
    # Shards are summed; the default context is max_context.
    q8 = preflight(SPLIT, "model-Q8_0-00001-of-00002.gguf")
    default = harness.estimate_memory(q8, LoadOptions())
    assert default == harness.estimate_memory(q8, LoadOptions(context_length=8192))
    assert default > 8 * GIB


def test_local_choice_prefers_the_exact_label(tmp_path: Path) -> None:
    shards = ["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]
    for name in ["m-BF16.gguf", "m-F16.gguf", *shards, "mmproj-m-F16.gguf"]:
        (tmp_path / name).write_bytes(b"GGUF")
    assert choose_local_gguf(tmp_path, "f16").name == "m-F16.gguf"
    assert choose_local_gguf(tmp_path, "BF16").name == "m-BF16.gguf"
    assert choose_local_gguf(tmp_path, "q8_0").name == "m-Q8_0-00001-of-00002.gguf"
    with pytest.raises(HarnessError, match="3 GGUF files match"):
        choose_local_gguf(tmp_path, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match=r"no \.gguf"):
        choose_local_gguf(tmp_path / "empty", None)


def test_shard_helpers() -> None:
    names = list(SPLIT)
    assert gguf_files.shard_group("model-Q4_K_M.gguf", names) == ["model-Q4_K_M.gguf"]
    assert gguf_files.matching_ggufs(names, "q8") == [
        "model-Q8_0-00001-of-00002.gguf",
        "model-Q8_0-00002-of-00002.gguf",
    ]
    assert not gguf_files.is_model_gguf("sub/mmproj-model-f16.gguf")


def test_context_length_resolution() -> None:
    settings = LlamaCppSettings(max_context=8192)
    assert resolve_context_length(131072, None, settings) == 8192
    assert resolve_context_length(2048, None, settings) == 2048
    assert resolve_context_length(0, None, settings) == 8192
    assert resolve_context_length(2048, 32768, settings) == 32768  # asked for: honoured
    with pytest.raises(HarnessError):
        resolve_context_length(2048, 4, settings)


def test_settings_come_from_extra_then_environment_then_defaults() -> None:
    env = {
        "CORTEX_LLAMACPP_N_THREADS": "6",
        "CORTEX_LLAMACPP_PREFIX_CACHE": "off",
        "CORTEX_LLAMACPP_FLASH_ATTN": "OFF",
    }
    settings = resolve_settings(LoadOptions(extra={"n_batch": "128", "other": 1}), env)
    assert (settings.n_threads, settings.n_batch, settings.prefix_cache) == (6, 128, False)
    assert settings.flash_attn == "off"
    assert settings.threads == 6 and settings.threads_batch == 6
    assert resolve_settings(LoadOptions(extra={"n_threads": 3}), env).n_threads == 3
    defaults = resolve_settings(LoadOptions(), {})
    assert defaults == LlamaCppSettings()
    assert defaults.threads >= 1 and defaults.threads_batch >= defaults.threads
    with pytest.raises(HarnessError, match="prefix_cache"):
        resolve_settings(LoadOptions(extra={"prefix_cache": "maybe"}), {})
    # the options of earlier versions that batching replaced are refused, never ignored
    for retired in ("PARALLEL", "BATCH_STREAMS"):
        with pytest.raises(HarnessError, match="is replaced by"):
            resolve_settings(LoadOptions(), {f"CORTEX_LLAMACPP_{retired}": "4"})


def test_importing_the_plugin_does_not_import_llama_cpp() -> None:
    import subprocess

    code = (
        "import sys, cortex_harness_llamacpp, cortex_harness_llamacpp.harness;"
        "print('llama_cpp' in sys.modules or 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
