"""Ranged, parallel, resumable HTTP downloads of one file, written in place with ``pwrite``.

Why not ``hf_hub_download``: it reads one stream per file through httpx2 in Python-sized chunks.
Into a file on this project's 2-core build machine, from ``cortex registry serve`` on loopback,
it moved 210-250 MB/s where curl moved 680-810 MB/s; stdlib ``http.client`` connections that
read with ``readinto`` into one reusable buffer and ``pwrite`` at their offset moved 1.0-1.1 GB/s
with 4 ranges at once, ahead of aiohttp, hf_transfer and huggingface_hub's own workers
(docs/benchmarks.md, "Cold start"). A file larger than one part is fetched as several ``Range``
requests at once, bounded by the fetch's connection count.

A download writes ``<dest>.cortex.incomplete`` and records the parts it finished in
``<dest>.cortex.incomplete.parts``; the caller moves the file into place only once every byte
is there. A dropped connection resumes its part where it stopped (``Range: bytes=N-M``). An
interrupted process leaves both files behind, and the next download of the same blob fetches only
the missing parts -- then checks the whole file against its sha256 (the etag of an LFS file),
because a process that died may not have written what it recorded; a mismatch starts over.

Tokens: the caller passes the headers for the *source's own* origin. A redirect to another origin
(a CDN) is followed without ``Authorization``: a token never leaves its source.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import getproxies, proxy_bypass

import attrs

log = logging.getLogger("cortex_source_huggingface")

MiB = 1 << 20
CONNECTIONS_ENV = "CORTEX_FETCH_CONNECTIONS"
PART_MB_ENV = "CORTEX_FETCH_PART_MB"
INCOMPLETE_SUFFIX = ".cortex.incomplete"
PARTS_SUFFIX = ".cortex.incomplete.parts"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # tried again, like a lost connection
_MAX_REDIRECTS = 5
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@attrs.frozen
class TransferSettings:
    """How a fetch uses the network. ``connections`` bounds the requests in flight for a whole
    fetch (all its files); a file larger than ``part_bytes`` is fetched as parts in parallel."""

    connections: int = 4
    part_bytes: int = 64 * MiB
    buffer_bytes: int = 4 * MiB
    timeout: float = 30.0
    attempts: int = 5  # consecutive failures of one part without a byte of progress
    retry_wait: float = 0.5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TransferSettings:
        """Defaults, with ``$CORTEX_FETCH_CONNECTIONS`` and ``$CORTEX_FETCH_PART_MB`` applied."""
        environ = os.environ if environ is None else environ
        settings = cls()
        connections = environ.get(CONNECTIONS_ENV, "").strip()
        if connections.isdigit() and int(connections) > 0:
            settings = attrs.evolve(settings, connections=int(connections))
        part = environ.get(PART_MB_ENV, "").strip()
        if part.isdigit() and int(part) > 0:
            settings = attrs.evolve(settings, part_bytes=int(part) * MiB)
        return settings


class TransferError(Exception):
    """A download that failed; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Cancelled(Exception):
    """Another file of the same fetch failed; this one stops between two reads."""


class _Busy(Exception):
    """A status worth another try (``_RETRY_STATUSES``); counted like a lost connection."""


# ---- connections -----------------------------------------------------------------------------


def origin_of(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def _safe_url(url: str) -> str:
    """A URL for messages: no query string (a CDN's is a signature)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class ConnectionPool:
    """Keep-alive connections per (thread, origin), so the parts a worker fetches one after the
    other reuse one connection. Honours ``http_proxy`` / ``https_proxy`` / ``no_proxy``
    (a plain-HTTP proxy: absolute-form requests for http, ``CONNECT`` for https)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._proxies = getproxies()
        self._ssl: ssl.SSLContext | None = None

    def _proxy_for(self, scheme: str, host: str) -> tuple[str, int, dict[str, str]] | None:
        proxy = self._proxies.get(scheme)
        if not proxy or proxy_bypass(host):
            return None
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        headers = {}
        if parts.username:
            import base64

            raw = f"{parts.username}:{parts.password or ''}".encode()
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(raw).decode()
        return parts.hostname or "", parts.port or 80, headers

    def get(self, url: str) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
        """A connection for ``url``, the request target to send, and proxy headers."""
        scheme, host, port = origin_of(url)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        proxy = self._proxy_for(scheme, host)
        extra: dict[str, str] = {}
        if proxy is not None and scheme == "http":
            target, extra = url, proxy[2]
        cache: dict[tuple[str, str, int], http.client.HTTPConnection]
        cache = self._local.__dict__.setdefault("connections", {})
        conn = cache.get((scheme, host, port))
        if conn is None:
            conn = self._open(scheme, host, port, proxy)
            cache[(scheme, host, port)] = conn
            with self._lock:
                self._all.append(conn)
        return conn, target, extra

    def _open(
        self, scheme: str, host: str, port: int, proxy: tuple[str, int, dict[str, str]] | None
    ) -> http.client.HTTPConnection:
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            if proxy is not None:
                conn = http.client.HTTPSConnection(
                    proxy[0], proxy[1], timeout=self.timeout, context=self._ssl
                )
                conn.set_tunnel(host, port, headers=proxy[2])
                return conn
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        if scheme != "http":
            raise TransferError(f"cannot download from a {scheme!r} URL")
        if proxy is not None:
            return http.client.HTTPConnection(proxy[0], proxy[1], timeout=self.timeout)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def discard(self, url: str) -> None:
        """Close this thread's connection to ``url``'s origin (after an error mid-response)."""
        cache = self._local.__dict__.get("connections", {})
        conn = cache.pop(origin_of(url), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


def open_get(
    pool: ConnectionPool,
    url: str,
    headers: Mapping[str, str],
    byte_range: str | None,
) -> tuple[http.client.HTTPResponse, str]:
    """GET ``url`` (following redirects); returns the response and the URL that answered.

    ``headers`` belong to ``url``'s origin: once a redirect leaves that origin, the request goes
    on without ``Authorization`` (a token never leaves its source)."""
    home = origin_of(url)
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        send = {k: v for k, v in headers.items() if origin_of(current) == home or not _is_auth(k)}
        send["Accept-Encoding"] = "identity"
        if byte_range is not None:
            send["Range"] = byte_range
        conn, target, extra = pool.get(current)
        try:
            conn.request("GET", target, headers={**send, **extra})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException):
            pool.discard(current)
            # a keep-alive connection the server closed while idle: one fresh try
            conn, target, extra = pool.get(current)
            try:
                conn.request("GET", target, headers={**send, **extra})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException):
                pool.discard(current)
                raise
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            response.read()
            if not location:
                raise TransferError(
                    f"{_safe_url(current)} redirected without a Location", response.status
                )
            current = urljoin(current, location)
            continue
        return response, current
    raise TransferError(f"too many redirects from {_safe_url(url)}")


def _is_auth(header: str) -> bool:
    return header.lower() in ("authorization", "cookie")


# ---- one file, in parts ----------------------------------------------------------------------


@attrs.define
class _Part:
    index: int
    start: int
    end: int  # inclusive; -1 with an unknown size: read to the end of the body


class BlobDownload:
    """Download ``url`` into ``dest.cortex.incomplete`` (see the module docstring).

    ``run()`` returns the path of the complete file; the caller moves it into place. Parts run on
    ``executor`` (shared by every file of a fetch). The first part goes alone: its answer says
    whether the server honours ``Range`` (206) -- only then are the other parts submitted; a 200
    streams the whole file over that one connection."""

    def __init__(
        self,
        *,
        url: str,
        headers: Mapping[str, str],
        dest: Path,
        size: int | None,
        etag: str,
        settings: TransferSettings,
        pool: ConnectionPool,
        executor: Executor,
        on_bytes: Callable[[int], None],
        cancelled: threading.Event,
    ) -> None:
        self.url = url
        self.headers = dict(headers)
        self.dest = dest
        self.size = size
        self.etag = etag
        self.settings = settings
        self.pool = pool
        self.executor = executor
        self.on_bytes = on_bytes
        self.cancelled = cancelled
        self.partial = dest.with_name(dest.name + INCOMPLETE_SUFFIX)
        self.parts_file = dest.with_name(dest.name + PARTS_SUFFIX)
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self._fd = -1
        self._resumable = False
        self._last_status: int | None = None
        self.resumed_bytes = 0

    # -- planning -----------------------------------------------------------------------------

    def _parts(self) -> list[_Part]:
        if self.size is None:
            return [_Part(0, 0, -1)]
        if self.size == 0:
            return []
        step = self.settings.part_bytes
        return [
            _Part(i, start, min(self.size, start + step) - 1)
            for i, start in enumerate(range(0, self.size, step))
        ]

    def _load_progress(self, parts: list[_Part]) -> set[int]:
        """Parts an earlier process finished, if its record matches this download and the
        result can be verified (a sha256 etag); otherwise nothing (and a fresh file)."""
        if not self._resumable:
            return set()
        try:
            record = json.loads(self.parts_file.read_text())
            if not self.partial.is_file() or self.partial.stat().st_size != self.size:
                return set()
        except (OSError, ValueError):
            return set()
        if (
            not isinstance(record, dict)
            or record.get("size") != self.size
            or record.get("part_bytes") != self.settings.part_bytes
            or not isinstance(record.get("done"), list)
        ):
            return set()
        return {i for i in record["done"] if isinstance(i, int) and 0 <= i < len(parts)}

    def _record(self, index: int) -> None:
        if not self._resumable:
            return
        with self._lock:
            self._done.add(index)
            body = json.dumps(
                {
                    "size": self.size,
                    "part_bytes": self.settings.part_bytes,
                    "done": sorted(self._done),
                }
            )
            tmp = self.parts_file.with_name(f"{self.parts_file.name}.{threading.get_ident()}.tmp")
            try:
                tmp.write_text(body)
                tmp.replace(self.parts_file)
            except OSError as exc:  # progress is an optimisation; the download goes on
                log.debug("could not record download progress in %s: %s", self.parts_file, exc)

    # -- running ------------------------------------------------------------------------------

    def run(self) -> Path:
        """Download every missing byte; returns the complete ``*.cortex.incomplete`` file.
        A failed download keeps what it has only where a later one can resume from it."""
        try:
            return self._run()
        except BaseException:
            if not self._resumable:
                self._forget()
            raise

    def _run(self) -> Path:
        parts = self._parts()
        # Only a multi-part file with a sha256 etag can resume across processes (it is checked
        # against its etag once complete); anything else starts over.
        self._resumable = len(parts) > 1 and bool(_SHA256.match(self.etag))
        for attempt in (1, 2):
            self._done = self._load_progress(parts)
            self.resumed_bytes = sum(p.end - p.start + 1 for p in parts if p.index in self._done)
            if self.resumed_bytes:
                log.info(
                    "resuming %s: %d of %d parts already downloaded",
                    self.dest.name,
                    len(self._done),
                    len(parts),
                )
                self.on_bytes(self.resumed_bytes)
            flags = os.O_RDWR | os.O_CREAT | (0 if self._done else os.O_TRUNC)
            self._fd = os.open(self.partial, flags, 0o666)  # the umask applies, as to hf's blobs
            try:
                if self.size is not None and not self._done:
                    os.ftruncate(self._fd, self.size)
                self._download([p for p in parts if p.index not in self._done])
                actual = os.fstat(self._fd).st_size
                if self.size is not None and actual != self.size:
                    raise TransferError(
                        f"{self.dest.name}: expected {self.size} bytes, got {actual}"
                    )
                if self.resumed_bytes and not self._verified():
                    if attempt == 2:
                        raise TransferError(f"{self.dest.name} failed its sha256 check twice")
                    log.warning(
                        "%s: the resumed download does not match its sha256; starting over",
                        self.dest.name,
                    )
                    self.on_bytes(-(self.size or 0))
                    self._forget()
                    continue
            finally:
                os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(OSError):
                self.parts_file.unlink()
            return self.partial
        raise AssertionError("unreachable")

    def _forget(self) -> None:
        for path in (self.partial, self.parts_file):
            with contextlib.suppress(OSError):
                path.unlink()

    def _verified(self) -> bool:
        digest = hashlib.sha256()
        view = memoryview(bytearray(self.settings.buffer_bytes))
        with open(self.partial, "rb", buffering=0) as f:
            while n := f.readinto(view):
                digest.update(view[:n])
        return digest.hexdigest() == self.etag

    def _download(self, todo: list[_Part]) -> None:
        """The first part alone until its answer says whether ranges work, then the rest."""
        if not todo:
            return
        first, rest = todo[0], todo[1:]
        answered = threading.Event()
        ranges = [True]

        def on_answer(ok: bool) -> None:
            ranges[0] = ok
            answered.set()

        def first_part() -> None:
            try:
                self._fetch_part(first, on_answer)
            finally:
                answered.set()

        futures: list[Future[None]] = [self.executor.submit(first_part)]
        answered.wait()
        if rest and ranges[0] and not (futures[0].done() and futures[0].exception()):
            futures += [self.executor.submit(self._fetch_part, p) for p in rest]
        errors: list[BaseException] = []
        for future in futures:
            try:
                future.result()
            except BaseException as exc:
                errors.append(exc)
                self.cancelled.set()
        if errors:
            real = [e for e in errors if not isinstance(e, Cancelled)]
            raise (real or errors)[0]

    def _last_byte(self, part: _Part, whole: bool) -> int | None:
        """The last byte (inclusive) this request must deliver; None: read to the end."""
        if whole:
            return self.size - 1 if self.size is not None else None
        return part.end if part.end != -1 else None

    def _fetch_part(self, part: _Part, on_answer: Callable[[bool], None] | None = None) -> None:
        """One part (or, when the server ignores ``Range``, the whole file), resuming a dropped
        connection where it stopped."""
        view = memoryview(bytearray(self.settings.buffer_bytes))
        pos = part.start
        whole = False  # the server answered 200: the body is the whole file from byte 0
        failures = 0
        furthest = pos  # an attempt that ends short of this made no progress
        while True:
            if self.cancelled.is_set():
                raise Cancelled()
            last = self._last_byte(part, whole)
            if last is not None and pos > last:
                break
            wanted = None
            if pos or last is not None:
                wanted = f"bytes={pos}-{'' if last is None else last}"
            try:
                response, answered_by = open_get(self.pool, self.url, self.headers, wanted)
                try:
                    if response.status == 206:
                        self._check_range(response, pos, answered_by)
                    elif response.status == 200:
                        if part.index != 0:
                            raise TransferError(
                                f"{_safe_url(answered_by)} stopped honouring Range requests"
                            )
                        if pos:  # resuming, but the server starts at byte 0 again
                            self.on_bytes(-pos)
                            pos = 0
                        whole = True
                    else:
                        message = _status_message(response.status, answered_by, response.read(4096))
                        if response.status in _RETRY_STATUSES:
                            self._last_status = response.status
                            raise _Busy(message)
                        raise TransferError(message, response.status)
                    if on_answer is not None:
                        on_answer(response.status == 206)
                        on_answer = None
                    last = self._last_byte(part, whole)
                    while n := response.readinto(view):
                        if self.cancelled.is_set():
                            raise Cancelled()
                        _pwrite_all(self._fd, view[:n], pos)
                        pos += n
                        self.on_bytes(n)
                    if last is not None and pos <= last:
                        raise http.client.IncompleteRead(b"", last - pos + 1)
                    break
                finally:
                    response.close()
            except (Cancelled, TransferError):
                self.pool.discard(self.url)
                raise
            except (OSError, http.client.HTTPException, _Busy) as exc:
                self.pool.discard(self.url)
                failures = 1 if pos > furthest else failures + 1
                furthest = max(furthest, pos)
                if failures >= self.settings.attempts:
                    raise TransferError(
                        f"downloading {_safe_url(self.url)} failed {failures} times in a row "
                        f"at byte {pos}: {type(exc).__name__}: {exc}",
                        self._last_status if isinstance(exc, _Busy) else None,
                    ) from None
                log.warning(
                    "%s: %s at byte %d (%s); trying again",
                    self.dest.name,
                    "busy" if isinstance(exc, _Busy) else "connection lost",
                    pos,
                    exc,
                )
                time.sleep(min(4.0, self.settings.retry_wait * failures))
        if not whole:
            self._record(part.index)

    def _check_range(self, response: http.client.HTTPResponse, pos: int, url: str) -> None:
        match = _CONTENT_RANGE.match((response.getheader("Content-Range") or "").strip())
        if match is None or int(match.group(1)) != pos:
            raise TransferError(f"{_safe_url(url)} answered a Range request with the wrong range")
        total = match.group(3)
        if self.size is not None and total != "*" and int(total) != self.size:
            raise TransferError(
                f"{_safe_url(url)} has {total} bytes, expected {self.size} (the file changed?)"
            )


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _status_message(status: int, url: str, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().splitlines()
    detail = f": {text[0][:200]}" if text else ""
    return f"{_safe_url(url)} answered HTTP {status}{detail}"
