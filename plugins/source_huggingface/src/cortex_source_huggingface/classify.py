"""What a repo's file list says about its weights, and which GGUF file a quant request means.

Pure functions over file names and sizes (no network, no huggingface_hub), shared by the online
preflight (the registry's file list) and the offline one (the files already in the cache).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import attrs

from cortex.source import NoLoadableWeightsError, QuantNotFoundError, RepoFile, WeightFormat

# Quant labels as they appear in GGUF file names: Q4_K_M, IQ3_XXS, Q8_0, F16, BF16, ...
_QUANT = re.compile(
    r"(?i)(?:^|[-_.])((?:I?Q\d+(?:_[A-Z0-9]+)*)|BF16|F16|F32|FP16|FP32|MXFP4)(?=$|[-_.])"
)
_SHARD = re.compile(r"(?i)-(\d{5})-of-(\d{5})\.(?:gguf|safetensors)$")
# Preferred when several GGUF files exist and no quant was asked for: the usual sweet spot
# first, then bigger and more exact ones.
DEFAULT_QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q6_K", "Q8_0", "BF16", "F16", "F32",
)  # fmt: skip
# GGUF files that are not a language model by themselves (vision projectors).
_AUXILIARY_GGUF = re.compile(r"(?i)(^|/)mmproj")
_SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")


@attrs.frozen
class Classification:
    """Preflight's reading of a file list: format, quants, the chosen GGUF file, bytes."""

    weight_format: str
    quants: tuple[str, ...]
    gguf_file: str | None
    download_bytes: int


def quant_of(path: str) -> str | None:
    """The quant label in a GGUF file name, upper-cased (``tiny.q4_k_m.gguf`` -> ``Q4_K_M``)."""
    stem = path.rsplit("/", 1)[-1]
    stem = _SHARD.sub("", stem)
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    matches = _QUANT.findall(stem)
    return matches[-1].upper() if matches else None


def _is_first_shard_or_single(path: str) -> bool:
    match = _SHARD.search(path)
    return match is None or int(match.group(1)) == 1


def gguf_candidates(files: Sequence[RepoFile]) -> dict[str, str]:
    """quant label -> GGUF file (first shard of a split file); files without a label are keyed
    by their name. Vision projectors (``mmproj*``) are not candidates."""
    found: dict[str, str] = {}
    for f in sorted(files, key=lambda f: f.path):
        if not f.path.lower().endswith(".gguf") or _AUXILIARY_GGUF.search(f.path):
            continue
        if not _is_first_shard_or_single(f.path):
            continue
        label = quant_of(f.path) or f.path.rsplit("/", 1)[-1]
        found.setdefault(label, f.path)
    return found


def weight_format(files: Sequence[RepoFile]) -> str:
    names = [f.path.lower() for f in files]
    has_gguf = any(n.endswith(".gguf") and not _AUXILIARY_GGUF.search(n) for n in names)
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if has_gguf and safetensors:
        return WeightFormat.BOTH
    if has_gguf:
        return WeightFormat.GGUF
    if safetensors:
        sharded = (
            len(safetensors) > 1
            or any(n.endswith(".safetensors.index.json") for n in names)
            or any(_SHARD.search(n) for n in safetensors)
        )
        return WeightFormat.SAFETENSORS_SHARDED if sharded else WeightFormat.SAFETENSORS
    return WeightFormat.NONE


def choose_gguf(candidates: dict[str, str], quant: str | None, model_id: str) -> str | None:
    """The GGUF file for ``quant`` (case-insensitive); a default when ``quant`` is None.

    An exact label wins; otherwise a request that is a substring of exactly one label (or file
    name) wins; otherwise :class:`QuantNotFoundError` lists the available quants and the nearest.
    """
    if not candidates:
        return None
    labels = sorted(candidates)
    if quant is None:
        for preferred in DEFAULT_QUANT_PREFERENCE:
            if preferred in candidates:
                return candidates[preferred]
        return candidates[labels[0]]
    wanted = quant.strip().upper()
    if wanted in candidates:
        return candidates[wanted]
    matching = [
        label
        for label in labels
        if wanted in label.upper() or wanted in candidates[label].rsplit("/", 1)[-1].upper()
    ]
    if len(matching) == 1:
        return candidates[matching[0]]
    available = ", ".join(labels)
    if matching:
        raise QuantNotFoundError(
            model_id,
            f"quant {quant!r} is ambiguous in {model_id}: it matches {', '.join(matching)}; "
            "ask for one of them",
            requested=quant,
            available=labels,
            suggestion=matching[0],
        )
    nearest = difflib.get_close_matches(wanted, labels, n=1, cutoff=0.0)
    suggestion = nearest[0] if nearest else None
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    raise QuantNotFoundError(
        model_id,
        f"quant {quant!r} not found in {model_id}; available: {available}{hint}",
        requested=quant,
        available=labels,
        suggestion=suggestion,
    )


def classify(files: Sequence[RepoFile], quant: str | None, model_id: str) -> Classification:
    """Classify a repo and size what a load of it downloads; typed errors carry ``model_id``.

    ``download_bytes``: for GGUF (or BOTH with a quant asked for) the chosen GGUF file (all its
    shards); otherwise every safetensors file plus the small config/tokenizer files at the root.
    A quant asked of a repo without GGUF files is left to the harness (no error here).
    """
    fmt = weight_format(files)
    if fmt == WeightFormat.NONE:
        shown = ", ".join(f.path for f in list(files)[:20]) or "no files at all"
        raise NoLoadableWeightsError(
            model_id,
            f"{model_id} has no loadable weights (no *.gguf and no *.safetensors files; "
            f"found: {shown})",
            files=[f.path for f in files],
        )
    candidates = gguf_candidates(files)
    gguf_file = choose_gguf(candidates, quant, model_id)
    sizes = {f.path: f.size or 0 for f in files}
    if gguf_file is not None and (fmt == WeightFormat.GGUF or quant is not None):
        download = sum(sizes[p] for p in gguf_shards(gguf_file, sizes))
    else:
        download = sum(
            size
            for path, size in sizes.items()
            if path.endswith(".safetensors") or ("/" not in path and _is_small_file(path))
        )
    return Classification(
        weight_format=fmt,
        quants=tuple(sorted(candidates)),
        gguf_file=gguf_file,
        download_bytes=download,
    )


def gguf_shards(gguf_file: str, all_files: Sequence[str] | dict[str, int]) -> list[str]:
    """Every shard of a split GGUF file (``x-00001-of-00003.gguf`` ...), or just the file."""
    match = _SHARD.search(gguf_file)
    if match is None:
        return [gguf_file]
    prefix = gguf_file[: match.start()]
    total = match.group(2)
    return sorted(
        p
        for p in all_files
        if p.startswith(prefix) and (m := _SHARD.search(p)) is not None and m.group(2) == total
    )


def _is_small_file(path: str) -> bool:
    return path.lower().endswith(_SMALL_FILE_SUFFIXES)
