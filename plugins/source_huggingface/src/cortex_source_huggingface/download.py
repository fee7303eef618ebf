"""Fetch the missing files of one commit into a huggingface_hub cache, in parallel.

Each file: one ``HEAD`` through huggingface_hub (``get_hf_file_metadata``: the etag that names
the blob, the size, Xet metadata), then the bytes through :mod:`transfer` -- ranged, parallel,
resumable -- into ``blobs/<etag>``, and a relative symlink ``snapshots/<commit>/<file>`` pointing
at it: exactly what ``hf_hub_download`` leaves behind, so huggingface_hub (and the ``hf`` tools)
read a cache filled here, offline, and vice versa. The blob is written under huggingface_hub's own
lock file (``.locks/models--org--name/<etag>.lock``), so a concurrent ``hf_hub_download`` of the
same blob waits instead of downloading it twice.

Files stored on Xet (the HEAD says so) go through ``hf_hub_download`` when ``hf_xet`` is installed:
Xet's own transfer is parallel and native, and it is the only client that can deduplicate chunks
against what the cache already has.

Every request of a fetch shares one bound (``TransferSettings.connections``): up to that many
files are in flight, and their parts share as many connections.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs

from cortex_source_huggingface import cache
from cortex_source_huggingface.progress import FetchProgress, format_bytes
from cortex_source_huggingface.transfer import (
    BlobDownload,
    Cancelled,
    ConnectionPool,
    TransferError,
    TransferSettings,
)

log = logging.getLogger("cortex_source_huggingface")

_SAFE_ETAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class InsufficientSpaceError(Exception):
    """The cache's disk cannot hold what the fetch still has to download."""


@attrs.frozen
class Target:
    """Where one fetch writes: the registry, the repo, the commit and the cache."""

    endpoint: str
    repo_path: str
    commit: str
    cache_dir: Path
    token: str | bool  # the source's own token, or False (never None: see hub.py)
    timeout: float

    @property
    def storage(self) -> Path:
        return cache.repo_folder(self.cache_dir, self.repo_path)

    def url(self, file: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_path, file, revision=self.commit, endpoint=self.endpoint)

    def pointer(self, file: str) -> Path:
        return cache.snapshot_dir(self.cache_dir, self.repo_path, self.commit) / file

    def lock_path(self, etag: str) -> Path:
        return self.cache_dir / ".locks" / self.storage.name / f"{etag}.lock"


@attrs.frozen
class FileMeta:
    file: str
    etag: str
    size: int | None
    xet: bool


def fetch_files(
    target: Target,
    files: list[str],
    reporter: FetchProgress,
    settings: TransferSettings | None = None,
) -> None:
    """Make every one of ``files`` complete in the snapshot of ``target.commit``.

    Raises huggingface_hub's errors (from the ``HEAD``), :class:`TransferError` (from a
    download) or :class:`InsufficientSpaceError`; the caller maps them to source errors."""
    settings = settings or TransferSettings.from_env()
    if not files:
        return
    started = time.monotonic()
    pool = ConnectionPool(settings.timeout)
    cancelled = threading.Event()
    width = max(1, min(settings.connections, len(files)))
    counted = _Counter()
    parts = ThreadPoolExecutor(settings.connections, thread_name_prefix="fetch-part")
    heads = ThreadPoolExecutor(width, thread_name_prefix="fetch-file")
    try:
        metas = _all(heads, [functools.partial(_head, target, f) for f in files], cancelled)
        _check_space(target, metas)
        jobs: list[Callable[[], None]] = [
            functools.partial(
                _fetch_one, target, m, reporter, settings, pool, parts, cancelled, counted
            )
            for m in sorted(metas, key=lambda m: -(m.size or 0))
        ]
        _all(heads, jobs, cancelled)
    finally:
        cancelled.set()
        heads.shutdown(wait=True, cancel_futures=True)
        parts.shutdown(wait=True, cancel_futures=True)
        pool.close()
    seconds = time.monotonic() - started
    if counted.bytes:
        log.info(
            "fetched %d file(s), %s in %.2fs (%s/s) from %s",
            len(files),
            format_bytes(counted.bytes),
            seconds,
            format_bytes(counted.bytes / seconds if seconds > 0 else 0),
            target.endpoint,
        )


class _Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n


def _all(
    executor: ThreadPoolExecutor, jobs: list[Callable[[], Any]], stop: threading.Event
) -> list[Any]:
    """Run ``jobs``, return their results in order; on the first failure, stop the others and
    raise it (the failure that caused a cancellation, not the cancellations)."""
    futures: list[Future[Any]] = [executor.submit(job) for job in jobs]
    results, errors = [], []
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:
            stop.set()
            errors.append(exc)
    if errors:
        real = [e for e in errors if not isinstance(e, Cancelled)]
        raise (real or errors)[0]
    return results


def _head(target: Target, file: str) -> FileMeta:
    from huggingface_hub import get_hf_file_metadata

    meta = get_hf_file_metadata(
        target.url(file),
        token=target.token,
        timeout=target.timeout,
        endpoint=target.endpoint,
        library_name="cortex",
    )
    etag = meta.etag or ""
    if not _SAFE_ETAG.match(etag) or ".." in etag:
        raise TransferError(f"{target.url(file)} has no usable ETag ({meta.etag!r})")
    if meta.commit_hash and meta.commit_hash != target.commit:
        raise TransferError(
            f"{target.url(file)} answered for commit {meta.commit_hash}, not {target.commit}"
        )
    return FileMeta(file=file, etag=etag, size=meta.size, xet=meta.xet_file_data is not None)


def _check_space(target: Target, metas: list[FileMeta]) -> None:
    """Refuse a fetch the disk cannot hold, before writing a byte of it."""
    needed = 0
    for meta in metas:
        blob = target.storage / "blobs" / meta.etag
        if blob.exists() or meta.size is None:
            continue
        needed += meta.size
    if not needed:
        return
    folder = target.storage
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InsufficientSpaceError(
            f"the cache {target.cache_dir} needs {format_bytes(needed)} more and its disk has "
            f"{format_bytes(free)} free"
        )


def _fetch_one(
    target: Target,
    meta: FileMeta,
    reporter: FetchProgress,
    settings: TransferSettings,
    pool: ConnectionPool,
    parts: ThreadPoolExecutor,
    cancelled: threading.Event,
    counted: _Counter,
) -> None:
    """One file: reuse its blob if another revision brought it, else download it, then link."""
    from huggingface_hub.utils import WeakFileLock

    blob = target.storage / "blobs" / meta.etag
    pointer = target.pointer(meta.file)
    blob.parent.mkdir(parents=True, exist_ok=True)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    _tag_cache_dir(target.cache_dir)
    if blob.exists():
        _link(blob, pointer)
        return
    if (meta.xet and _xet_available()) or not hasattr(os, "pwrite"):  # no pwrite: Windows
        _fetch_with_hf(target, meta, reporter)
        return
    lock = target.lock_path(meta.etag)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():  # another process finished it while we waited for the lock
            _link(blob, pointer)
            return
        bar = reporter.bar(meta.file, meta.size)

        def on_bytes(n: int) -> None:
            bar.update(n)
            counted.add(n)

        try:
            download = BlobDownload(
                url=target.url(meta.file),
                headers=_headers(target.token),
                dest=blob,
                size=meta.size,
                etag=meta.etag,
                settings=settings,
                pool=pool,
                executor=parts,
                on_bytes=on_bytes,
                cancelled=cancelled,
            )
            complete = download.run()
        finally:
            bar.close()
        os.replace(complete, blob)
        _link(blob, pointer)


def _headers(token: str | bool) -> dict[str, str]:
    """huggingface_hub's headers for the source's own origin: its user agent and, with a
    token of our own, ``Authorization`` (``token=False`` sends none)."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(token=token, library_name="cortex")


def _link(blob: Path, pointer: Path) -> None:
    """``pointer`` -> ``blob`` as a relative symlink, as huggingface_hub makes them (a copy where
    the filesystem has no symlinks)."""
    relative = os.path.relpath(blob, pointer.parent)
    with contextlib.suppress(FileNotFoundError):
        if pointer.is_symlink() and os.readlink(pointer) == relative:
            return
        pointer.unlink()
    try:
        os.symlink(relative, pointer)
    except FileExistsError:
        if os.path.realpath(pointer) != os.path.realpath(blob):
            raise
    except OSError:
        shutil.copyfile(blob, pointer)


def _tag_cache_dir(cache_dir: Path) -> None:
    """huggingface_hub's ``CACHEDIR.TAG`` (backup tools skip the folder), where it has one."""
    try:
        from huggingface_hub._local_folder import _create_cachedir_tag
    except ImportError:
        return
    with contextlib.suppress(OSError):
        _create_cachedir_tag(Path(cache_dir))


def _xet_available() -> bool:
    try:
        from huggingface_hub.utils import is_xet_available
    except ImportError:
        return False
    return bool(is_xet_available())


def _fetch_with_hf(target: Target, meta: FileMeta, reporter: FetchProgress) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(
        target.repo_path,
        meta.file,
        revision=target.commit,
        endpoint=target.endpoint,
        cache_dir=target.cache_dir,
        token=target.token,
        tqdm_class=reporter.tqdm_class(meta.file),
    )
