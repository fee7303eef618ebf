"""File-name rules: weight format, GGUF quants (split files included) and the default quant."""

from __future__ import annotations

import pytest
from cortex_source_local.weights import choose_quant, classify, gguf_quants

from cortex.source import WeightFormat


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["config.json", "model.safetensors"], WeightFormat.SAFETENSORS),
        (
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
            WeightFormat.SAFETENSORS_SHARDED,
        ),
        (
            ["model.safetensors.index.json", "a.safetensors", "b.safetensors"],
            WeightFormat.SAFETENSORS_SHARDED,
        ),
        (["m.Q4_K_M.gguf"], WeightFormat.GGUF),
        (["m.Q4_K_M.gguf", "model.safetensors"], WeightFormat.BOTH),
        (["pytorch_model.bin", "config.json"], WeightFormat.NONE),
        ([], WeightFormat.NONE),
    ],
)
def test_classify(paths: list[str], expected: str) -> None:
    assert classify(paths) == expected


def test_gguf_quants_group_split_files_and_normalise_case() -> None:
    quants = gguf_quants(
        [
            "README.md",
            "tiny.q8_0.gguf",
            "sub/tiny-Q4_K_M-00002-of-00002.gguf",
            "sub/tiny-Q4_K_M-00001-of-00002.gguf",
            "tiny-IQ2_XXS.gguf",
            "tiny_F16.gguf",
            "model.gguf",
        ]
    )
    by_name = {q.name: q.files for q in quants}
    assert by_name == {
        "F16": ("tiny_F16.gguf",),
        "IQ2_XXS": ("tiny-IQ2_XXS.gguf",),
        "Q4_K_M": ("sub/tiny-Q4_K_M-00001-of-00002.gguf", "sub/tiny-Q4_K_M-00002-of-00002.gguf"),
        "Q8_0": ("tiny.q8_0.gguf",),
        "model": ("model.gguf",),
    }


def test_choose_quant_prefers_q4_k_m_then_falls_back_to_first() -> None:
    quants = gguf_quants(["m.Q8_0.gguf", "m.Q4_K_M.gguf", "m.F32.gguf"])
    chosen = choose_quant(quants, None)
    assert chosen is not None and chosen.name == "Q4_K_M"
    odd = gguf_quants(["m.Q3_K_L.gguf", "m.Q2_K.gguf"])
    chosen = choose_quant(odd, None)
    assert chosen is not None and chosen.name == "Q2_K"


def test_choose_quant_explicit_is_case_insensitive_and_may_be_missing() -> None:
    quants = gguf_quants(["m.Q8_0.gguf", "m.Q4_K_M.gguf"])
    chosen = choose_quant(quants, "q8_0")
    assert chosen is not None and chosen.first_file == "m.Q8_0.gguf"
    assert choose_quant(quants, "Q6_K") is None
    assert choose_quant([], None) is None


def test_vision_projectors_are_not_quants() -> None:
    paths = ["m.Q4_K_M.gguf", "mmproj-m-F16.gguf"]
    assert [q.name for q in gguf_quants(paths)] == ["Q4_K_M"]
    assert classify(["mmproj-m-F16.gguf", "model.safetensors"]) == WeightFormat.SAFETENSORS
