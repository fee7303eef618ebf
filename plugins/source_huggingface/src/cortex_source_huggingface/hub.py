"""A model source backed by huggingface_hub, for any registry that speaks the HF wire format.

One instance serves one configured scheme (``huggingface``, ``helexa``, a private mirror) with
that scheme's endpoint, token and cache dir, always passed *explicitly* to huggingface_hub:

- ``token``: the source's own token, read once here from the env var named by ``auth_env``, or
  ``False``. Never ``None``, which would make huggingface_hub send ``HF_TOKEN`` (or the saved
  login) to whatever endpoint it talks to, a third-party registry included.
- ``endpoint`` and ``cache_dir``: huggingface_hub reads ``HF_ENDPOINT``/``HF_HOME`` once at import,
  so the environment cannot be used to switch registries per call.

Preflight is one request (repo info with file sizes). Fetch serves a complete cached snapshot
without any network; otherwise it asks for the current commit (one request, which fails fast on a
dead registry, unlike a file download's retries) and downloads the missing files into the cache
pinned to that commit, in parallel and in ranges (:mod:`download`, :mod:`transfer`), into the
layout huggingface_hub writes and reads. A download goes into a temporary file, resumes a dropped
connection with a ``Range`` request, checks the size and only then moves the file into place, so
a snapshot never contains a partial file. With the registry unreachable, a cached model still
preflights and fetches from the cache; an uncached one fails with
:class:`cortex.source.RegistryUnreachableError` naming the endpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cortex.source import (
    FetchError,
    InvalidRepoIdError,
    ModelSourceId,
    NoLoadableWeightsError,
    Preflight,
    ProgressCallback,
    RegistryUnreachableError,
    RepoFile,
    RepoNotFoundError,
    SourceError,
    SourceSettings,
    UnauthorizedError,
    WeightFormat,
)
from cortex_source_huggingface import cache
from cortex_source_huggingface.classify import classify, gguf_shards
from cortex_source_huggingface.download import InsufficientSpaceError, Target, fetch_files
from cortex_source_huggingface.progress import FetchProgress
from cortex_source_huggingface.transfer import TransferError, TransferSettings

log = logging.getLogger("cortex_source_huggingface")

MAIN = "main"
REQUEST_TIMEOUT_SECONDS = 30.0


class HubSource:
    """A configured source for one scheme (see the module docstring)."""

    def __init__(self, settings: SourceSettings, transfer: TransferSettings | None = None) -> None:
        self.settings = settings
        # connections and part size of a fetch ($CORTEX_FETCH_CONNECTIONS, $CORTEX_FETCH_PART_MB)
        self.transfer = transfer or TransferSettings.from_env()
        token = os.environ.get(settings.auth_env) if settings.auth_env else None
        self._token: str | None = token or None
        # What the latest preflight saw per repo: (commit, files). Fetch pins downloads to that
        # commit, so a load gets exactly what was preflighted, and a cached commit needs no
        # request at all.
        self._seen: dict[str, tuple[str, tuple[RepoFile, ...]]] = {}

    def __repr__(self) -> str:
        return (
            f"HubSource(scheme={self.settings.scheme!r}, endpoint={self.settings.endpoint!r}, "
            f"has_token={self.has_token})"
        )

    @property
    def has_token(self) -> bool:
        return self._token is not None

    @property
    def _token_arg(self) -> str | bool:
        """What to pass as huggingface_hub's ``token``: ours, or False (never None)."""
        return self._token if self._token is not None else False

    def qualified(self, model_id: ModelSourceId) -> str:
        """``scheme:org/name`` with this source's configured scheme."""
        return str(model_id.with_default_scheme(self.settings.scheme))

    # ---- preflight -------------------------------------------------------------------------

    def preflight(self, model_id: ModelSourceId, quant: str | None = None) -> Preflight:
        """One registry round trip: repo exists, auth ok, which weights, how many bytes."""
        qid = self.qualified(model_id)
        repo = model_id.repo_path
        try:
            info = self._model_info(repo)
        except Exception as exc:
            error = self._map_error(exc, qid)
            if not isinstance(error, RegistryUnreachableError):
                raise error from None
            return self._preflight_from_cache(model_id, quant, error)
        files = tuple(RepoFile(path=s.rfilename, size=s.size) for s in (info.siblings or []))
        self._seen[repo] = (info.sha, files)
        return self._preflight(qid, info.sha, files, quant)

    def _preflight(
        self, qid: str, commit: str, files: tuple[RepoFile, ...], quant: str | None
    ) -> Preflight:
        try:
            found = classify(files, quant, qid)
        except NoLoadableWeightsError:
            # No weights by file name; a harness may still load it (the built-in echo harness
            # loads an ``echo.json``). Which harness accepts a repo is not this source's question:
            # the neuron's one harness choice (cortex.harness_choice) answers it, and says
            # ``no_loadable_weights`` when none does.
            return Preflight(
                model_id=qid, revision=commit, weight_format=WeightFormat.NONE, files=files
            )
        return Preflight(
            model_id=qid,
            revision=commit,
            weight_format=found.weight_format,
            files=files,
            gguf_file=found.gguf_file,
            quants=found.quants,
            download_bytes=found.download_bytes,
        )

    def _preflight_from_cache(
        self, model_id: ModelSourceId, quant: str | None, unreachable: RegistryUnreachableError
    ) -> Preflight:
        """The registry is down: describe the cached snapshot of ``main``, if there is one."""
        qid = self.qualified(model_id)
        repo = model_id.repo_path
        commit = cache.cached_commit(self.settings.cache_dir, repo, MAIN)
        files = tuple(cache.cached_files(self.settings.cache_dir, repo, commit)) if commit else ()
        if commit is None or not files:
            raise unreachable
        try:
            result = self._preflight(qid, commit, files, quant)
        except SourceError as exc:
            raise RegistryUnreachableError(
                qid,
                f"{unreachable.message}; the cached copy cannot serve this request: {exc.message}",
                endpoint=self.settings.endpoint,
            ) from None
        log.warning(
            "registry %s unreachable; %s served from the cache (commit %s)",
            self.settings.endpoint,
            qid,
            commit[:12],
        )
        self._seen[repo] = (commit, files)
        return result

    def _model_info(self, repo: str, revision: str | None = None) -> Any:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.settings.endpoint, library_name="cortex")
        return api.model_info(
            repo,
            revision=revision,
            files_metadata=True,
            token=self._token_arg,
            timeout=REQUEST_TIMEOUT_SECONDS,
        )

    # ---- fetch -----------------------------------------------------------------------------

    def fetch(
        self,
        model_id: ModelSourceId,
        files: list[str],
        progress: ProgressCallback | None = None,
        revision: str | None = None,
    ) -> Path:
        """Make ``files`` complete in this source's cache and return the snapshot folder.

        ``revision`` defaults to the commit the latest preflight saw (else ``main``). A split
        GGUF file brings its other shards along.
        """
        qid = self.qualified(model_id)
        repo = model_id.repo_path
        cache_dir = self.settings.cache_dir
        wanted = self._expand(repo, self._validated(qid, files))
        ref = revision if revision and not cache.is_commit(revision) else MAIN
        pinned = revision or (self._seen[repo][0] if repo in self._seen else None) or MAIN

        commit = cache.cached_commit(cache_dir, repo, pinned)
        if commit and cache.has_files(cache_dir, repo, commit, wanted):
            log.info("%s: %d file(s) served from the cache %s", qid, len(wanted), cache_dir)
            self._write_ref(repo, ref, commit)
            return cache.snapshot_dir(cache_dir, repo, commit)

        reporter = FetchProgress(qid, progress)
        try:
            if commit is None:
                commit = self._model_info(repo, None if pinned == MAIN else pinned).sha
            assert commit is not None
            missing = [f for f in wanted if not cache.has_files(cache_dir, repo, commit, [f])]
            log.info("fetching %s (%d file(s)) from %s", qid, len(missing), self.settings.endpoint)
            target = Target(
                endpoint=self.settings.endpoint,
                repo_path=repo,
                commit=commit,
                cache_dir=Path(cache_dir),
                token=self._token_arg,
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
            fetch_files(target, missing, reporter, self.transfer)
        except Exception as exc:
            raise self._map_error(exc, qid) from None
        self._write_ref(repo, ref, commit)
        return cache.snapshot_dir(cache_dir, repo, commit)

    def _validated(self, qid: str, files: list[str]) -> list[str]:
        """Repo-relative file names only: a registry cannot make us write outside the cache."""
        if not files:
            raise FetchError(qid, f"nothing to fetch for {qid}: the harness needs no files")
        for name in files:
            parts = name.split("/")
            if (
                not name
                or name.startswith("/")
                or "\\" in name
                or any(p in ("", ".", "..") for p in parts)
            ):
                raise FetchError(qid, f"refusing to fetch the unsafe file name {name!r}")
        return list(dict.fromkeys(files))

    def _expand(self, repo: str, files: list[str]) -> list[str]:
        """Add the other shards of a split GGUF file (a harness names only the first)."""
        known = [f.path for f in self._seen[repo][1]] if repo in self._seen else []
        expanded: list[str] = []
        for file in files:
            shards = gguf_shards(file, known) if file.lower().endswith(".gguf") else [file]
            expanded.extend(shards or [file])
        return list(dict.fromkeys(expanded))

    def _write_ref(self, repo: str, ref: str, commit: str) -> None:
        """Record ``ref -> commit`` the way huggingface_hub does, so an offline start finds it."""
        path = cache.repo_folder(self.settings.cache_dir, repo) / "refs" / ref
        try:
            if path.is_file() and path.read_text().strip() == commit:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            tmp.replace(path)
        except OSError as exc:
            log.warning("could not record %s -> %s in %s: %s", ref, commit[:12], path, exc)

    # ---- errors ----------------------------------------------------------------------------

    def _map_error(self, exc: BaseException, qid: str) -> SourceError:
        """A huggingface_hub / transport error as a typed source error (never with the token)."""
        import httpx2
        from huggingface_hub import errors as hf

        if isinstance(exc, SourceError):
            return exc
        if isinstance(exc, hf.HFValidationError):  # an id or revision the hub cannot express
            return InvalidRepoIdError(qid, f"{qid} is not a valid repo: {_first_line(exc)}")
        endpoint = self.settings.endpoint
        if isinstance(exc, TransferError):
            return self._transfer_error(exc, qid)
        if isinstance(exc, InsufficientSpaceError):
            return FetchError(qid, f"cannot fetch {qid}: {exc}")
        unreachable = httpx2.TransportError | hf.OfflineModeIsEnabled | hf.LocalEntryNotFoundError
        if isinstance(exc, unreachable):
            return RegistryUnreachableError(
                qid,
                f"registry {endpoint} is unreachable ({type(exc).__name__}) and {qid} is not "
                f"in the cache {self.settings.cache_dir}",
                endpoint=endpoint,
            )
        if isinstance(exc, hf.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if isinstance(exc, hf.GatedRepoError) or (
                status in (401, 403) and not isinstance(exc, hf.RepositoryNotFoundError)
            ):
                return UnauthorizedError(
                    qid,
                    f"registry {endpoint} refused access to {qid} (HTTP {status}): "
                    f"{self._token_hint()}",
                    endpoint=endpoint,
                    status=status,
                )
            if isinstance(exc, hf.RepositoryNotFoundError | hf.RevisionNotFoundError):
                private = "" if self.has_token else f" (if it is private: {self._token_hint()})"
                return RepoNotFoundError(
                    qid,
                    f"{qid} not found at {endpoint}{private}",
                    endpoint=endpoint,
                )
            if isinstance(exc, hf.RemoteEntryNotFoundError):
                return FetchError(
                    qid, f"a file of {qid} is missing at {endpoint}: {_first_line(exc)}"
                )
            if status is not None and status >= 500:
                return RegistryUnreachableError(
                    qid,
                    f"registry {endpoint} answered HTTP {status} for {qid}",
                    endpoint=endpoint,
                    status=status,
                )
            return FetchError(qid, f"registry {endpoint} answered HTTP {status} for {qid}")
        return FetchError(
            qid, f"fetching {qid} from {endpoint} failed: {type(exc).__name__}: {_first_line(exc)}"
        )

    def _transfer_error(self, exc: TransferError, qid: str) -> SourceError:
        """A failed download of the parallel fetch (:mod:`transfer`), typed like a HEAD's."""
        endpoint = self.settings.endpoint
        status = exc.status
        if status in (401, 403):
            return UnauthorizedError(
                qid,
                f"registry {endpoint} refused a download of {qid} (HTTP {status}): "
                f"{self._token_hint()}",
                endpoint=endpoint,
                status=status,
            )
        if status == 404:
            return FetchError(qid, f"a file of {qid} is missing at {endpoint}: {exc.message}")
        if status is None or status >= 500:
            return RegistryUnreachableError(
                qid,
                f"downloading {qid} from {endpoint} failed: {exc.message}",
                endpoint=endpoint,
                **({"status": status} if status is not None else {}),
            )
        return FetchError(qid, f"downloading {qid} from {endpoint} failed: {exc.message}")

    def _token_hint(self) -> str:
        env = self.settings.auth_env
        if self.has_token:
            return f"the token from ${env} was not accepted"
        if env:
            return f"no token configured (set ${env})"
        return f"no token configured (set auth_env in [sources.{self.settings.scheme}])"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
