"""What a repo's file list says about its weights: the format and, for GGUF, the quants.

Pure functions over file names, so they are easy to test and a preflight never opens a weight
file. The rules follow the conventions of the Hugging Face hub, where these repos come from:
``model.safetensors`` or ``model-00001-of-00003.safetensors`` (+ ``model.safetensors.index.json``)
for transformers checkpoints, ``name.Q4_K_M.gguf`` / ``name-Q4_K_M.gguf`` for GGUF quants, and
``name-Q4_K_M-00001-of-00002.gguf`` for a GGUF split into parts (llama.cpp loads the first part).
"""

from __future__ import annotations

import re

import attrs

from cortex.source import WeightFormat

_SHARD_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})$")
# Vision projectors ship as GGUF files next to the model but are not a model by themselves.
_PROJECTOR = re.compile(r"(^|/)mmproj", re.IGNORECASE)
_QUANT_SUFFIX = re.compile(
    r"[.\-_](?P<quant>(?:I?Q\d+(?:_[A-Z0-9]+)*)|BF16|FP16|FP32|F16|F32|MXFP4)$",
    re.IGNORECASE,
)

PREFERRED_QUANTS: tuple[str, ...] = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q8_0", "F16")
"""Without an explicit quant, the first of these a repo has wins: Q4_K_M is the usual balance of
size and quality. A repo with none of them falls back to its first quant in name order."""


def is_gguf(path: str) -> bool:
    """A GGUF model file (vision projectors excluded)."""
    return path.lower().endswith(".gguf") and not _PROJECTOR.search(path)


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def classify(paths: list[str]) -> str:
    """The :class:`cortex.source.WeightFormat` of a repo from its file names."""
    gguf = any(is_gguf(p) for p in paths)
    safetensors = [p for p in paths if is_safetensors(p)]
    if gguf and safetensors:
        return WeightFormat.BOTH
    if gguf:
        return WeightFormat.GGUF
    if not safetensors:
        return WeightFormat.NONE
    sharded = any(p.endswith(".safetensors.index.json") for p in paths) or any(
        _SHARD_SUFFIX.search(p.rsplit(".", 1)[0]) for p in safetensors
    )
    return WeightFormat.SAFETENSORS_SHARDED if sharded else WeightFormat.SAFETENSORS


@attrs.frozen
class GgufQuant:
    """One quant of a GGUF repo: its name and its files (several when split into parts)."""

    name: str
    files: tuple[str, ...]

    @property
    def first_file(self) -> str:
        """The file llama.cpp is pointed at (it finds the other parts itself)."""
        return self.files[0]


def gguf_quants(paths: list[str]) -> list[GgufQuant]:
    """Group a repo's GGUF files by quant, sorted by quant name.

    A file whose name carries no recognisable quant counts as a quant named after its stem, so a
    repo with a single ``model.gguf`` still offers exactly one choice.
    """
    groups: dict[str, list[str]] = {}
    for path in paths:
        if not is_gguf(path):
            continue
        stem = path.rsplit("/", 1)[-1][: -len(".gguf")]
        stem = _SHARD_SUFFIX.sub("", stem)
        match = _QUANT_SUFFIX.search(stem)
        name = match.group("quant").upper() if match else stem
        groups.setdefault(name, []).append(path)
    return [GgufQuant(name, tuple(sorted(files))) for name, files in sorted(groups.items())]


def choose_quant(quants: list[GgufQuant], requested: str | None) -> GgufQuant | None:
    """The quant to load: the requested one (case-insensitive), else the preferred default.

    Returns None when a quant was requested and the repo does not have it; the caller turns that
    into a typed error listing what it has.
    """
    if not quants:
        return None
    by_name = {q.name.upper(): q for q in quants}
    if requested is not None:
        return by_name.get(requested.upper())
    for preferred in PREFERRED_QUANTS:
        if preferred in by_name:
            return by_name[preferred]
    return quants[0]
