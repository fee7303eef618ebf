"""Classification of a repo's file list and the choice of a GGUF file for a quant."""

from __future__ import annotations

import pytest
from cortex_source_huggingface.classify import classify, gguf_shards, quant_of

from cortex.source import NoLoadableWeightsError, QuantNotFoundError, RepoFile, WeightFormat

MODEL_ID = "helexa:acme/tiny"


def repo(*names: str, size: int = 10) -> list[RepoFile]:
    return [RepoFile(path=name, size=size) for name in names]


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("tiny.Q4_K_M.gguf", "Q4_K_M"),
        ("tiny-q4_k_m.gguf", "Q4_K_M"),
        ("Tiny-IQ3_XXS.gguf", "IQ3_XXS"),
        ("ggml-model-f16.gguf", "F16"),
        ("model-BF16.gguf", "BF16"),
        ("sub/dir/tiny.Q8_0.gguf", "Q8_0"),
        ("tiny-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
        ("tiny.gguf", None),
    ],
)
def test_quant_of(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


def test_formats() -> None:
    assert classify(repo("config.json", "model.safetensors"), None, MODEL_ID).weight_format == (
        WeightFormat.SAFETENSORS
    )
    sharded = repo(
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    )
    assert classify(sharded, None, MODEL_ID).weight_format == WeightFormat.SAFETENSORS_SHARDED
    assert classify(repo("a.Q4_0.gguf"), None, MODEL_ID).weight_format == WeightFormat.GGUF
    both = repo("config.json", "model.safetensors", "a.Q4_0.gguf")
    assert classify(both, None, MODEL_ID).weight_format == WeightFormat.BOTH


def test_nothing_loadable() -> None:
    with pytest.raises(NoLoadableWeightsError) as caught:
        classify(repo("README.md", "config.json", "pytorch_model.bin"), None, MODEL_ID)
    assert caught.value.model_id == MODEL_ID
    payload = caught.value.to_json()
    assert payload["kind"] == "no_loadable_weights"
    assert "pytorch_model.bin" in payload["files"]


def test_vision_projector_alone_is_not_loadable() -> None:
    with pytest.raises(NoLoadableWeightsError):
        classify(repo("mmproj-model-f16.gguf"), None, MODEL_ID)


def test_quant_choice_is_case_insensitive() -> None:
    listing = repo("tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf", "tiny.F16.gguf")
    assert classify(listing, "q8_0", MODEL_ID).gguf_file == "tiny.Q8_0.gguf"
    assert classify(listing, "Q8_0", MODEL_ID).gguf_file == "tiny.Q8_0.gguf"
    assert classify(listing, "f16", MODEL_ID).gguf_file == "tiny.F16.gguf"
    assert classify(listing, "q8", MODEL_ID).gguf_file == "tiny.Q8_0.gguf"  # unique substring
    # no quant asked: the usual default
    assert classify(listing, None, MODEL_ID).gguf_file == "tiny.Q4_K_M.gguf"
    assert classify(listing, None, MODEL_ID).quants == ("F16", "Q4_K_M", "Q8_0")


def test_quant_not_found_suggests_the_nearest() -> None:
    listing = repo("tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf")
    with pytest.raises(QuantNotFoundError) as caught:
        classify(listing, "q4_k_s", MODEL_ID)
    error = caught.value
    assert error.model_id == MODEL_ID
    assert error.details["available"] == ["Q4_K_M", "Q8_0"]
    assert error.details["suggestion"] == "Q4_K_M"
    assert "did you mean 'Q4_K_M'" in error.message
    assert error.to_json()["kind"] == "quant_not_found"


def test_ambiguous_quant() -> None:
    listing = repo("tiny.Q4_K_M.gguf", "tiny.Q4_0.gguf")
    with pytest.raises(QuantNotFoundError, match="ambiguous"):
        classify(listing, "Q4", MODEL_ID)


def test_download_bytes() -> None:
    listing = [
        RepoFile("config.json", 100),
        RepoFile("tokenizer.json", 1000),
        RepoFile("model.safetensors", 50_000),
        RepoFile("README.md", 7),
        RepoFile("tiny.Q4_K_M.gguf", 20_000),
        RepoFile("tiny.Q8_0.gguf", 30_000),
    ]
    # safetensors + small root files when no quant is asked of a BOTH repo
    assert classify(listing, None, MODEL_ID).download_bytes == 51_100
    # just the chosen GGUF when a quant is asked
    assert classify(listing, "Q8_0", MODEL_ID).download_bytes == 30_000
    gguf_only = [f for f in listing if f.path.endswith(".gguf")]
    assert classify(gguf_only, None, MODEL_ID).download_bytes == 20_000


def test_split_gguf() -> None:
    listing = repo(
        "big-Q4_K_M-00001-of-00003.gguf",
        "big-Q4_K_M-00002-of-00003.gguf",
        "big-Q4_K_M-00003-of-00003.gguf",
        "big-Q8_0.gguf",
        size=100,
    )
    found = classify(listing, "q4_k_m", MODEL_ID)
    assert found.gguf_file == "big-Q4_K_M-00001-of-00003.gguf"
    assert found.download_bytes == 300
    assert found.quants == ("Q4_K_M", "Q8_0")
    assert len(gguf_shards(found.gguf_file, [f.path for f in listing])) == 3
