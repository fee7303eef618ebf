"""A model source for repos that already sit in a directory on this machine (or on NFS).

The store is laid out ``ROOT/<org>/<name>/...``: model id ``local:Qwen/Qwen3-0.6B`` is the directory
``ROOT/Qwen/Qwen3-0.6B``. Preflight walks that directory once (the "registry round trip" of a
local store); fetch checks the files are there and returns the directory itself, because copying
gigabytes from one disk to another to load them once is what this source exists to avoid.

Model ids were already refused by :class:`cortex.source.ModelSourceId` if they contain ``..`` or
other escapes, but a store can hold symlinks, so every path is resolved and checked to lie under
the resolved root before it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cortex.config import ConfigError
from cortex.source import (
    FetchError,
    ModelSourceId,
    Preflight,
    ProgressCallback,
    QuantNotFoundError,
    RegistryUnreachableError,
    RepoFile,
    RepoNotFoundError,
    SourceSettings,
    UnauthorizedError,
)
from cortex_source_local.weights import choose_quant, classify, gguf_quants

log = logging.getLogger(__name__)


class StoreEndpointError(ConfigError):
    """An endpoint that does not name a local directory (raised when the source is created, so
    the neuron refuses a bad config at start instead of at the first load)."""


def store_root(endpoint: str) -> Path:
    """``file:///srv/models`` (or a plain absolute path ``/srv/models``) -> ``Path('/srv/models')``.

    Relative paths are refused: a neuron runs as a service whose working directory nobody
    thinks about, so a relative store would silently point somewhere else.
    """
    if endpoint.startswith("file:"):
        parts = urlsplit(endpoint)
        if parts.netloc not in ("", "localhost"):
            raise StoreEndpointError(
                f"endpoint {endpoint!r} names the host {parts.netloc!r}; a local store must be "
                "on this machine (mount it, then use file:///mount/point)"
            )
        path = unquote(parts.path) or "/"
    else:
        path = endpoint
    if not path.startswith("/"):
        raise StoreEndpointError(
            f"endpoint {endpoint!r} is not an absolute path; use file:///absolute/path"
        )
    return Path(path)


class LocalSource:
    """One configured ``local``-style scheme (an operator may configure several stores, each
    under its own scheme with ``plugin = "local"``)."""

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.root = store_root(settings.endpoint)

    @property
    def has_token(self) -> bool:
        """A directory on disk has no token; file permissions are the access control."""
        return False

    # ---- paths ---------------------------------------------------------------------------

    def _qualified(self, model_id: ModelSourceId) -> str:
        """The id as errors report it: always with this source's scheme."""
        return f"{self.settings.scheme}:{model_id.repo_path}"

    def _resolved_root(self, model_id: ModelSourceId) -> Path:
        try:
            root = self.root.resolve(strict=True)
        except OSError:
            raise RegistryUnreachableError(
                self._qualified(model_id),
                f"the model store {self.root} does not exist (is it mounted?)",
                endpoint=self.settings.endpoint,
            ) from None
        if not root.is_dir():
            raise RegistryUnreachableError(
                self._qualified(model_id),
                f"the model store {self.root} is not a directory",
                endpoint=self.settings.endpoint,
            )
        return root

    def repo_dir(self, model_id: ModelSourceId) -> Path:
        """The repo's directory, resolved, guaranteed to lie inside the store."""
        qualified = self._qualified(model_id)
        root = self._resolved_root(model_id)
        candidate = (root / model_id.org / model_id.name).resolve()
        if not candidate.is_relative_to(root):
            raise RepoNotFoundError(qualified, "the repo path resolves outside the model store")
        if not candidate.is_dir():
            raise RepoNotFoundError(
                qualified, f"no directory {model_id.repo_path} in the model store {self.root}"
            )
        return candidate

    # ---- preflight -----------------------------------------------------------------------

    def _list_files(self, model_id: ModelSourceId, repo: Path) -> list[RepoFile]:
        """Every regular file under the repo (recursively), skipping dot-files such as ``.git``
        and the ``.cache`` folder ``huggingface-cli download --local-dir`` leaves behind."""
        root = self._resolved_root(model_id)
        files: list[RepoFile] = []

        def refuse(error: OSError) -> None:
            raise error

        try:
            for dirpath, dirnames, filenames in os.walk(repo, onerror=refuse):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if filename.startswith("."):
                        continue
                    path = Path(dirpath) / filename
                    target = path.resolve()
                    if not target.is_relative_to(root):
                        log.warning("skipping %s: it points outside the model store", path)
                        continue
                    if not target.is_file():
                        continue
                    relative = path.relative_to(repo).as_posix()
                    files.append(RepoFile(relative, target.stat().st_size))
        except PermissionError as exc:
            raise UnauthorizedError(
                self._qualified(model_id),
                f"the neuron's user may not read {exc.filename}",
            ) from None
        return files

    @staticmethod
    def _fingerprint(repo: Path, files: list[RepoFile]) -> str:
        """A 40-hex revision for the listing (names, sizes, modification times): it changes
        when someone replaces a file in the store, so a neuron can tell a stale load apart."""
        digest = hashlib.sha1(usedforsecurity=False)
        for f in files:
            mtime = (repo / f.path).stat().st_mtime_ns
            digest.update(f"{f.path}\0{f.size}\0{mtime}\n".encode())
        return digest.hexdigest()

    def preflight(self, model_id: ModelSourceId, quant: str | None = None) -> Preflight:
        """List the repo, classify its weights and pick the GGUF quant; nothing is read.

        ``download_bytes`` is 0: a fetch downloads nothing. A ``quant`` is checked against the
        GGUF files; for a repo without GGUF files it is left to the harness. A repo without
        weight files by name is described all the same (``weight_format = "none"``): whether an
        installed harness loads it (the ``echo`` harness loads an ``echo.json``) is the neuron's
        one harness choice, which answers ``no_loadable_weights`` when none does.
        """
        qualified = self._qualified(model_id)
        repo = self.repo_dir(model_id)
        files = self._list_files(model_id, repo)
        names = [f.path for f in files]
        weight_format = classify(names)
        quants = gguf_quants(names)
        chosen = choose_quant(quants, quant)
        if quants and quant is not None and chosen is None:
            available = [q.name for q in quants]
            raise QuantNotFoundError(
                qualified,
                f"the repo has no {quant!r} GGUF file (it has {', '.join(available)})",
                requested=quant,
                available=available,
            )
        return Preflight(
            model_id=qualified,
            revision=self._fingerprint(repo, files),
            weight_format=weight_format,
            files=tuple(files),
            gguf_file=chosen.first_file if chosen else None,
            quants=tuple(q.name for q in quants),
            download_bytes=0,
        )

    # ---- fetch ---------------------------------------------------------------------------

    def fetch(
        self,
        model_id: ModelSourceId,
        files: list[str],
        progress: ProgressCallback | None = None,
        revision: str | None = None,
    ) -> Path:
        """Check that every requested file is in the repo and return the repo directory.

        No copy is made, so there is no partial file to leave behind; progress is reported once
        per file as already complete, so a caller that shows progress still sees each file.
        ``revision`` (a preflight's) must still describe the repo: a store edited between
        preflight and fetch is reported rather than loaded half old, half new.
        """
        qualified = self._qualified(model_id)
        repo = self.repo_dir(model_id)
        root = self._resolved_root(model_id)
        if revision is not None:
            current = self._fingerprint(repo, self._list_files(model_id, repo))
            if current != revision:
                raise FetchError(
                    qualified,
                    f"the repo changed on disk since preflight (revision {revision[:12]}, now "
                    f"{current[:12]}); preflight again",
                    revision=revision,
                    current=current,
                )
        missing: list[str] = []
        for name in files:
            target = (repo / name).resolve()
            if not target.is_relative_to(root):
                raise FetchError(qualified, f"{name!r} resolves outside the model store")
            if not target.is_file():
                missing.append(name)
                continue
            if not os.access(target, os.R_OK):
                raise UnauthorizedError(qualified, f"the neuron's user may not read {name!r}")
            if progress is not None:
                size = target.stat().st_size
                progress(name, size, size)
        if missing:
            raise FetchError(
                qualified, f"missing from the model store: {', '.join(missing)}", missing=missing
            )
        return repo
