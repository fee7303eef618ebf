"""Weights from the safetensors files onto the target device, one tensor at a time.

transformers 5 memory-maps every safetensors file of a checkpoint. Asked for the dtype the
weights are *stored* in, it makes each parameter a view of its file's mapping: nothing is copied,
the pages come from the page cache. Asked for another dtype, it converts every tensor while all
files stay mapped until the end (peak: both copies), and a GPU load that goes through the host
(``from_pretrained`` then ``.to(device)``) holds the whole model in host memory first -- a
model larger than the host's free RAM could not reach a GPU that would hold it.

So a load here is: ``from_pretrained`` at the stored dtype (views, no copy), then
:func:`place_weights` moves each parameter to the device and dtype it must have, one at a time,
and hands the pages of its source range back to the kernel (``madvise(MADV_DONTNEED)`` on the
page-aligned inside of a range that lies in a mapping of a safetensors file: pages that hold
only bytes already copied; they are page cache, and a later read would fault the same bytes in
again). Peak host memory is the model as it stays plus about one tensor:

- CPU, stored dtype = float32: no copy at all (the parameters stay views of the files);
- CPU, stored bf16/fp16: one float32 copy, the bf16 pages released tensor by tensor;
- CUDA: every tensor goes straight to the device, the host keeps about one tensor's pages.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import logging
import mmap
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_HEADER_LIMIT = 100 * 1024 * 1024


def stored_dtype(snapshot: Path) -> Any | None:
    """The floating dtype most of the checkpoint's bytes are stored in (from the safetensors
    headers: a few KB read per file), or None when there is no readable safetensors file."""
    import torch

    counts: dict[str, int] = {}
    files = sorted(Path(snapshot).glob("*.safetensors"))
    for file in files:
        try:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > _HEADER_LIMIT:
                    return None
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            kind = entry.get("dtype")
            offsets = entry.get("data_offsets") or (0, 0)
            if kind in _STORED:
                counts[kind] = counts.get(kind, 0) + int(offsets[1]) - int(offsets[0])
    if not counts:
        return None
    return getattr(torch, _STORED[max(counts, key=lambda k: counts[k])])


@attrs.define
class Placement:
    """What :func:`place_weights` did (logged; tests read it)."""

    moved: int = 0  # parameters copied to another device or dtype
    kept: int = 0  # parameters left where they were (already right: views of the files)
    released_bytes: int = 0  # source pages handed back to the kernel


def fp32_patterns(model: Any, dtype: Any) -> list[str]:
    """Module name patterns transformers keeps in float32 at ``dtype`` (its keep-in-fp32 lists:
    the strict one for fp16 and bf16, the other one for fp16 only)."""
    import torch

    patterns: list[str] = []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    return patterns


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a parameter name lies under a module named by one of ``patterns`` (dotted
    components, ``*`` globbing within one)."""
    parts = name.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        for start in range(len(parts) - len(want) + 1):
            window = parts[start : start + len(want)]
            if all(fnmatch.fnmatchcase(p, w) for p, w in zip(window, want, strict=True)):
                return True
    return False


def place_weights(model: Any, device: Any, dtype: Any) -> Placement:
    """Move every parameter of ``model`` to ``device``, the floating ones at ``dtype`` (float32
    where transformers keeps a module in float32), one tensor at a time, releasing each source
    range; buffers move to ``device`` at the dtype they have."""
    import torch

    keep = fp32_patterns(model, dtype)
    mappings = _file_mappings()
    placement = Placement()
    with torch.no_grad():
        for name, param in model.named_parameters():
            want = _target_dtype(param, name, dtype, keep)
            if param.device == device and param.dtype == want:
                placement.kept += 1
                continue
            source = param.data
            param.data = source.to(device=device, dtype=want)
            placement.moved += 1
            placement.released_bytes += _release(source, mappings)
            del source
        for module in model.modules():
            # buffers keep their dtype (transformers computes RoPE's inv_freq in float32 and
            # keeps it so whatever the weights' dtype): they only change device
            for key, buffer in list(module._buffers.items()):
                if buffer is None or buffer.device == device:
                    continue
                module._buffers[key] = buffer.to(device=device)
                placement.released_bytes += _release(buffer, mappings)
    model.to(device)  # anything not reached above (a parameter-less submodule's state)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return placement


def _target_dtype(tensor: Any, name: str, dtype: Any, keep: list[str]) -> Any:
    import torch

    if not tensor.is_floating_point():
        return tensor.dtype
    if keep and _matches(name, keep):
        return torch.float32
    return dtype


# ---- handing source pages back ---------------------------------------------------------------


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``*.safetensors`` files (Linux only; empty
    elsewhere, where nothing is released and a load peaks at both copies, as before)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip().endswith(".safetensors"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


_libc: Any = None


def _madvise(address: int, length: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise(address, length, _MADV_DONTNEED) == 0


def _release(tensor: Any, mappings: list[tuple[int, int]]) -> int:
    """Drop the resident pages of ``tensor``'s bytes when they lie in a file mapping; returns
    the bytes released (0 for memory that is not a file's: never touched here)."""
    if not mappings or tensor.device.type != "cpu":
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = end // page * page
    if last <= first or not any(lo <= first and last <= hi for lo, hi in mappings):
        return 0
    return last - first if _madvise(first, last - first) else 0
