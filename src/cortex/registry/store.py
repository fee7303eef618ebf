"""The on-disk layout a registry serves, and the content-derived identity of each revision.

Layout (documented in docs/registry.md)::

    DIR/<org>/<name>/...              revision "main"
    DIR/<org>/<name>@<rev>/...        revision <rev> (percent-encoded: refs/pr/1 -> refs%2Fpr%2F1)

A revision's commit sha is derived from its content (every file's path, size and sha256), so the
same bytes always get the same 40-hex sha, a changed file always gets a new one, and clients that
cache by commit (huggingface_hub does) never confuse two versions. Nothing is written into DIR:
the registry is read-only and a directory can be served from read-only media.

Hashing a multi-gigabyte weight file takes seconds, so hashes are remembered per
(path, size, mtime); a file replaced in place is re-hashed on the next request.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote, unquote

import attrs

MAIN = "main"
REVISION_SEPARATOR = "@"
_HASH_CHUNK = 1 << 20


@attrs.frozen
class StoredFile:
    """One file of one revision: its repo-relative path, size, sha256 and where it lies."""

    path: str
    size: int
    sha256: str
    local_path: Path
    mtime: float


@attrs.frozen
class Revision:
    """One revision of one repo: its name, content-derived commit sha and files (sorted)."""

    repo_id: str
    name: str
    sha: str
    files: tuple[StoredFile, ...]

    def file(self, path: str) -> StoredFile | None:
        for stored in self.files:
            if stored.path == path:
                return stored
        return None

    @property
    def last_modified(self) -> float:
        return max((f.mtime for f in self.files), default=0.0)


def commit_sha(files: tuple[StoredFile, ...]) -> str:
    """A deterministic 40-hex id for a set of files (what git would call the commit)."""
    digest = hashlib.sha1(b"cortex-registry-revision\n")
    for stored in files:
        digest.update(f"{stored.path}\0{stored.size}\0{stored.sha256}\n".encode())
    return digest.hexdigest()


def revision_dir_name(name: str, revision: str) -> str:
    """The folder that holds ``revision`` of a repo whose main folder is ``name``."""
    if revision == MAIN:
        return name
    return f"{name}{REVISION_SEPARATOR}{quote(revision, safe='')}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_valid_segment(segment: str) -> bool:
    """A path segment a client may ask for: not empty, not ``.``/``..``, no separators, no
    control characters (a NUL reached ``open()``; a CR/LF is never part of a file name here)."""
    return (
        segment not in ("", ".", "..")
        and "/" not in segment
        and "\\" not in segment
        and _CONTROL.search(segment) is None
    )


def is_valid_repo_segment(segment: str) -> bool:
    """An org or repo name: a valid segment that is not hidden (``.cache`` is never a repo)."""
    return is_valid_segment(segment) and not segment.startswith(".")


class RepoStore:
    """Reads repos and revisions from a directory; thread-safe, re-scans on every call."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    # ---- lookups ---------------------------------------------------------------------------

    def repo_dir(self, org: str, name: str) -> Path | None:
        if not (is_valid_repo_segment(org) and is_valid_repo_segment(name)):
            return None
        if REVISION_SEPARATOR in name:
            return None
        path = self.root / org / name
        return path if path.is_dir() else None

    def revision_names(self, org: str, name: str) -> list[str]:
        """``main`` (when the plain folder exists) plus every ``name@rev`` folder."""
        org_dir = self.root / org
        if not is_valid_repo_segment(org) or not org_dir.is_dir():
            return []
        names = []
        prefix = name + REVISION_SEPARATOR
        for entry in sorted(org_dir.iterdir()):
            if not entry.is_dir():
                continue
            if entry.name == name:
                names.append(MAIN)
            elif entry.name.startswith(prefix):
                names.append(unquote(entry.name[len(prefix) :]))
        return names

    def repo_exists(self, org: str, name: str) -> bool:
        return (
            is_valid_repo_segment(org)
            and is_valid_repo_segment(name)
            and REVISION_SEPARATOR not in name
            and bool(self.revision_names(org, name))
        )

    def revision(self, org: str, name: str, revision: str) -> Revision | None:
        """A revision by branch name or by commit sha; None when there is no such revision."""
        if not self.repo_exists(org, name):
            return None
        names = self.revision_names(org, name)
        if revision in names:
            return self._load(org, name, revision)
        if len(revision) == 40:
            for candidate in names:
                loaded = self._load(org, name, candidate)
                if loaded.sha == revision:
                    return loaded
        return None

    def repo_ids(self) -> list[str]:
        """Every ``org/name`` in the directory (hidden folders are skipped)."""
        found = set()
        if not self.root.is_dir():
            return []
        for org_dir in sorted(self.root.iterdir()):
            if not org_dir.is_dir() or org_dir.name.startswith("."):
                continue
            for repo_dir in sorted(org_dir.iterdir()):
                if repo_dir.is_dir() and not repo_dir.name.startswith("."):
                    found.add(f"{org_dir.name}/{repo_dir.name.split(REVISION_SEPARATOR)[0]}")
        return sorted(found)

    def warm(self) -> tuple[int, int]:
        """Hash every file of every revision now (a server calls this in the background at
        start, so the first request for a multi-gigabyte model does not wait for its hashes).
        Returns (revisions, files)."""
        revisions = files = 0
        for repo_id in self.repo_ids():
            org, name = repo_id.split("/", 1)
            for revision in self.revision_names(org, name):
                files += len(self._load(org, name, revision).files)
                revisions += 1
        return revisions, files

    # ---- scanning --------------------------------------------------------------------------

    def _load(self, org: str, name: str, revision: str) -> Revision:
        folder = self.root / org / revision_dir_name(name, revision)
        files = tuple(sorted(self._scan(folder), key=lambda f: f.path))
        return Revision(repo_id=f"{org}/{name}", name=revision, sha=commit_sha(files), files=files)

    def _scan(self, folder: Path) -> list[StoredFile]:
        """Every file below ``folder`` (symlinks followed, hidden directories skipped).

        Each real directory is walked once per scan: a linked directory whose target was
        already reached (a loop back to itself or to a directory above it, a second link to the
        same directory, a link to a sibling) is skipped, and the files are listed under the
        first path that reached them: depth first, and in each directory its own
        subdirectories before its links, each group in name order. Why:
        ``os.walk(followlinks=True)`` descended into a loop until the path was too long, and a
        "diamond" of links (``d0/{l,r} -> d1``, ``d1/{l,r} -> d2``, ..., no loop) doubled the
        work per level: seconds of CPU per request at depth 12. Now the work is bounded by the
        number of real directories.
        """
        found = []
        seen = {os.path.realpath(folder)}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            kept = []
            for d in sorted(dirnames, key=lambda n: (os.path.islink(os.path.join(dirpath, n)), n)):
                if d.startswith("."):
                    continue
                real = os.path.realpath(os.path.join(dirpath, d))
                if real in seen:
                    continue
                seen.add(real)
                kept.append(d)
            dirnames[:] = kept
            for filename in filenames:
                local = Path(dirpath) / filename
                try:
                    stat = local.stat()
                except OSError:
                    continue  # a dangling symlink is not a file
                relative = local.relative_to(folder).as_posix()
                found.append(
                    StoredFile(
                        path=relative,
                        size=stat.st_size,
                        sha256=self._sha256(local, stat.st_size, stat.st_mtime_ns),
                        local_path=local,
                        mtime=stat.st_mtime,
                    )
                )
        return found

    def _sha256(self, path: Path, size: int, mtime_ns: int) -> str:
        key = (str(path), size, mtime_ns)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            self._hashes[key] = value
        return value
