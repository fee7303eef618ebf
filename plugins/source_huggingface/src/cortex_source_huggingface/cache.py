"""Reading a huggingface_hub cache directory without the network.

The layout is huggingface_hub's own (``models--org--name/{refs,snapshots,blobs}``), so a cache
filled by cortex can be read by ``hf`` tools and vice versa. Each source has its *own* cache dir
(see cortex.config), so ``refs/main`` of one registry never points at another registry's bytes.

A file counts as cached only when its snapshot entry resolves to a complete blob: huggingface_hub
downloads into a temporary ``*.incomplete`` file and renames it only once the size matched, so a
snapshot entry never points at a partial download.
"""

from __future__ import annotations

import re
from pathlib import Path

from cortex.source import RepoFile

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def repo_folder(cache_dir: Path, repo_path: str) -> Path:
    """``cache_dir/models--org--name`` (huggingface_hub's naming)."""
    return Path(cache_dir) / ("models--" + repo_path.replace("/", "--"))


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def cached_commit(cache_dir: Path, repo_path: str, revision: str) -> str | None:
    """The commit a revision points at in the cache (a commit sha is its own answer)."""
    if is_commit(revision):
        return revision
    ref = repo_folder(cache_dir, repo_path) / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if is_commit(commit) else None


def snapshot_dir(cache_dir: Path, repo_path: str, commit: str) -> Path:
    return repo_folder(cache_dir, repo_path) / "snapshots" / commit


def cached_files(cache_dir: Path, repo_path: str, commit: str) -> list[RepoFile]:
    """Every complete file of a cached snapshot, with its size."""
    root = snapshot_dir(cache_dir, repo_path, commit)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.rglob("*")):
        try:
            if not entry.is_file():  # follows the symlink; a dangling one is not a file
                continue
            size = entry.stat().st_size
        except OSError:
            continue
        found.append(RepoFile(path=entry.relative_to(root).as_posix(), size=size))
    return found


def has_files(cache_dir: Path, repo_path: str, commit: str, files: list[str]) -> bool:
    """Whether every one of ``files`` is complete in the snapshot ``commit``."""
    root = snapshot_dir(cache_dir, repo_path, commit)
    return all((root / f).is_file() for f in files)
