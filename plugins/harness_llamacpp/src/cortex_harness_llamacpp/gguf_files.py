"""Which GGUF file(s) of a repo a load uses.

GGUF repos hold one file per quantisation (``model-Q4_K_M.gguf``, ``model-Q8_0.gguf``), big ones
split into shards (``model-Q4_K_M-00001-of-00003.gguf``) that llama.cpp opens from the first, and
sometimes a multimodal projector (``mmproj-*.gguf``) that is not a language model. The quant is
matched case-insensitively as a substring of the file name, the way operators type it
(``q4_k_m``); preflight already chose a file, these helpers only complete and check the choice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

_SHARD = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def is_model_gguf(name: str) -> bool:
    """A GGUF that holds a language model (not a vision projector or an imatrix)."""
    base = name.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and not base.startswith(("mmproj", "imatrix"))


def shard_group(name: str, names: Iterable[str]) -> list[str]:
    """``name`` and the other shards of the same split file, in order (just ``[name]`` when the
    file is not split)."""
    match = _SHARD.match(name)
    if match is None:
        return [name]
    stem, count = match.group("stem"), match.group("count")
    shards = [
        n
        for n in names
        if (m := _SHARD.match(n)) and m.group("stem") == stem and m.group("count") == count
    ]
    return sorted(set(shards) | {name})


def first_shard(names: list[str]) -> str:
    """The file llama.cpp must be given: the ``-00001-of-`` shard, or the only file."""
    return sorted(names)[0]


def matching_ggufs(names: Iterable[str], quant: str | None) -> list[str]:
    """Model GGUF files whose name contains ``quant`` (case-insensitive); all of them without a
    quant."""
    candidates = sorted(n for n in names if is_model_gguf(n))
    if not quant:
        return candidates
    needle = quant.lower()
    return [n for n in candidates if needle in n.rsplit("/", 1)[-1].lower()]


def exact_quant_matches(names: Iterable[str], quant: str) -> list[str]:
    """Files whose name has ``quant`` as a whole label (``F16`` in ``m-F16.gguf``, not in
    ``m-BF16.gguf``); used to settle a substring match that hit several files."""
    label = re.compile(rf"(?i)(^|[-_.]){re.escape(quant)}($|[-_.])")
    out = []
    for name in names:
        stem = name.rsplit("/", 1)[-1]
        shard = _SHARD.match(stem)
        stem = shard.group("stem") if shard else stem[: -len(".gguf")]
        if label.search(stem):
            out.append(name)
    return out


def local_ggufs(snapshot: Path) -> list[str]:
    """Model GGUF files under a local snapshot directory, as paths relative to it."""
    return sorted(
        str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf") if is_model_gguf(p.name)
    )
