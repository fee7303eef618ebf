"""The registry's HTTP API: the subset of the Hugging Face wire format huggingface_hub uses.

Routes (all GET; resolve also HEAD)::

    /health                                           {"status": "ok"}
    /api/models                                       [{"id", "sha"}...]   every repo
    /api/models/{org}/{name}[/revision/{rev}]         repo info: id, sha, siblings with sizes
    /api/models/{org}/{name}/tree/{rev}[/{path}]      tree listing (?recursive=true)
    /{org}/{name}/resolve/{rev}/{path}                file bytes; Range -> 206

Paths are dispatched from the *raw* request path: huggingface_hub percent-encodes a revision with
its slashes (``refs%2Fpr%2F1``), and splitting after decoding would cut it in two.

Errors carry the ``X-Error-Code`` header huggingface_hub maps to its typed exceptions
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``) and a JSON body
``{"error": message}``. With a token configured every route but ``/health`` needs
``Authorization: Bearer <token>``: 401 without one, 403 with a wrong one (compared in constant
time).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from cortex.registry.requestlog import LoggedRequest, RequestLog
from cortex.registry.store import MAIN, RepoStore, Revision, StoredFile, is_valid_segment

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RegistryHttpError(Exception):
    """An error answer in the shape huggingface_hub understands."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit

    def response(self) -> Response:
        headers = {"X-Error-Message": header_safe(self.message)}
        if self.code:
            headers["X-Error-Code"] = self.code
        if self.commit:
            headers["X-Repo-Commit"] = self.commit
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_safe(text: str) -> str:
    """``text`` as a header value: ASCII, control characters escaped. Messages quote the path a
    client asked for, and a header is Latin-1 without CR/LF/NUL: a non-Latin-1 character made the
    answer a 500, a NUL dropped the connection, a CR/LF could have split the header."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", escaped)


@attrs.define
class Truncation:
    """Test fault: the next GET of ``path`` in ``repo_id`` drops the connection after N bytes."""

    repo_id: str
    path: str
    after_bytes: int


@attrs.define
class RegistryState:
    """What a running registry exposes to its owner: the store, the token, the request log and
    one-shot faults (used by tests to prove that interrupted downloads resume)."""

    store: RepoStore
    token: str | None = attrs.field(default=None, repr=False)
    request_log: RequestLog = attrs.field(factory=RequestLog)
    truncations: list[Truncation] = attrs.field(factory=list)

    def truncate_next_download(self, repo_id: str, path: str, after_bytes: int) -> None:
        self.truncations.append(Truncation(repo_id, path, after_bytes))

    def _take_truncation(self, repo_id: str, path: str) -> Truncation | None:
        for fault in self.truncations:
            if fault.repo_id == repo_id and fault.path == path:
                self.truncations.remove(fault)
                return fault
        return None


class RegistryApp(FastAPI):
    """Every HTTP request goes to :func:`dispatch`, without the framework's router.

    Why: the router matches the *decoded* path against ``.*``, which stops at a newline, so a
    path holding ``%0A`` got the framework's bare 404 (no ``X-Error-Code``, no JSON). The
    registry routes on the raw path anyway, so no path can miss it.
    """

    state_registry: RegistryState

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive)
        response = await run_in_threadpool(dispatch, self.state_registry, request)
        await response(scope, receive, send)


def dispatch(state: RegistryState, request: Request) -> Response:
    """One request: route it, answer errors in the registry's shape, log it."""
    raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
    try:
        response = _route(state, request, raw_path)
    except RegistryHttpError as exc:
        response = exc.response()
    except Exception:
        log.exception("registry: unexpected error on %s %r", request.method, raw_path)
        response = RegistryHttpError(500, "internal error; see the registry log").response()
    state.request_log.append(
        LoggedRequest(
            method=request.method,
            path=raw_path,
            query=request.url.query,
            authorization=request.headers.get("authorization"),
            range=request.headers.get("range"),
            status=response.status_code,
        )
    )
    return response


def create_app(root: Path, token: str | None = None) -> FastAPI:
    """A registry serving ``root``; ``app.state.registry`` is its :class:`RegistryState`."""
    state = RegistryState(store=RepoStore(Path(root)), token=token or None)
    app = RegistryApp(title="cortex registry", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = state
    app.state_registry = state
    return app


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _route(state: RegistryState, request: Request, raw_path: str) -> Response:
    segments = [unquote(s) for s in raw_path.split("?")[0].split("/")[1:]]
    if segments and segments[-1] == "" and len(segments) > 1:
        segments = segments[:-1]
    if segments == ["health"]:
        return JSONResponse({"status": "ok"})
    if request.method not in ("GET", "HEAD"):
        raise RegistryHttpError(405, f"method {request.method} is not allowed (read-only)")
    _check_auth(state, request)
    store = state.store
    if segments[:2] == ["api", "models"]:
        rest = segments[2:]
        if not rest:
            return JSONResponse(
                [
                    {"id": repo_id, "modelId": repo_id, "sha": _main_sha(store, repo_id)}
                    for repo_id in store.repo_ids()
                ]
            )
        if len(rest) >= 2:
            org, name, tail = rest[0], rest[1], rest[2:]
            if not tail:
                return _model_info(store, org, name, MAIN)
            if tail[0] == "revision" and len(tail) == 2:
                return _model_info(store, org, name, tail[1])
            if tail[0] == "tree" and len(tail) >= 2:
                recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
                return _tree(store, org, name, tail[1], "/".join(tail[2:]), recursive)
    elif len(segments) >= 5 and segments[2] == "resolve":
        org, name, revision, path = segments[0], segments[1], segments[3], segments[4:]
        return _resolve(state, request, org, name, revision, path)
    raise RegistryHttpError(404, f"no route {request.method} {raw_path}")


def _check_auth(state: RegistryState, request: Request) -> None:
    if state.token is None:
        return
    header = request.headers.get("authorization")
    if not header:
        raise RegistryHttpError(
            401, "authentication required: send 'Authorization: Bearer <token>'", "GatedRepo"
        )
    scheme, _, presented = header.partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), state.token.encode()
    )
    if not valid:
        raise RegistryHttpError(403, "Invalid credentials in Authorization header")


def _main_sha(store: RepoStore, repo_id: str) -> str | None:
    org, name = repo_id.split("/", 1)
    revision = store.revision(org, name, MAIN)
    return revision.sha if revision else None


def _revision_or_error(store: RepoStore, org: str, name: str, revision: str) -> Revision:
    if not store.repo_exists(org, name):
        raise RegistryHttpError(404, f"Repository {org}/{name} not found", "RepoNotFound")
    found = store.revision(org, name, revision)
    if found is None:
        raise RegistryHttpError(
            404, f"Revision {revision!r} of {org}/{name} not found", "RevisionNotFound"
        )
    return found


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _model_info(store: RepoStore, org: str, name: str, revision: str) -> Response:
    found = _revision_or_error(store, org, name, revision)
    body: dict[str, Any] = {
        "_id": found.sha[:24],
        "id": found.repo_id,
        "modelId": found.repo_id,
        "author": org,
        "sha": found.sha,
        "lastModified": _iso(found.last_modified),
        "createdAt": _iso(found.last_modified),
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "usedStorage": sum(f.size for f in found.files),
        "siblings": [_sibling(f) for f in found.files],
    }
    return JSONResponse(body)


def _sibling(stored: StoredFile) -> dict[str, Any]:
    return {
        "rfilename": stored.path,
        "size": stored.size,
        "blobId": stored.sha256[:40],
        "lfs": {"size": stored.size, "sha256": stored.sha256, "pointerSize": 134},
    }


def _tree(
    store: RepoStore, org: str, name: str, revision: str, under: str, recursive: bool
) -> Response:
    found = _revision_or_error(store, org, name, revision)
    prefix = f"{under.strip('/')}/" if under.strip("/") else ""
    entries: list[dict[str, Any]] = []
    directories: set[str] = set()
    for stored in found.files:
        if not stored.path.startswith(prefix):
            continue
        relative = stored.path[len(prefix) :]
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            if recursive or depth == 1:
                directories.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append(
                {
                    "type": "file",
                    "path": stored.path,
                    "size": stored.size,
                    "oid": stored.sha256[:40],
                    "lfs": {"oid": stored.sha256, "size": stored.size, "pointerSize": 134},
                }
            )
    if prefix and not entries and not directories:
        raise RegistryHttpError(
            404, f"{under!r} not found in {org}/{name}", "EntryNotFound", found.sha
        )
    listing = [
        {"type": "directory", "path": d, "size": 0, "oid": found.sha} for d in sorted(directories)
    ]
    return JSONResponse(listing + entries)


# --------------------------------------------------------------------------------------------
# File resolve (HEAD and GET, with Range)
# --------------------------------------------------------------------------------------------


def _resolve(
    state: RegistryState, request: Request, org: str, name: str, revision: str, path: list[str]
) -> Response:
    found = _revision_or_error(state.store, org, name, revision)
    if not all(is_valid_segment(part) for part in path):
        raise RegistryHttpError(400, "invalid file path")
    file_path = "/".join(path)
    stored = found.file(file_path)
    if stored is None:
        raise RegistryHttpError(
            404, f"{file_path} not found in {found.repo_id}@{revision}", "EntryNotFound", found.sha
        )
    headers = {
        "ETag": f'"{stored.sha256}"',
        "X-Repo-Commit": found.sha,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    start, end = 0, stored.size - 1
    status = 200
    range_header = request.headers.get("range")
    if range_header:
        parsed = _parse_range(range_header, stored.size)
        if parsed is None:
            return Response(
                status_code=416,
                headers={**headers, "Content-Range": f"bytes */{stored.size}"},
            )
        start, end = parsed
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{stored.size}"
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    limit = length
    if request.method == "GET":
        fault = state._take_truncation(found.repo_id, file_path)
        if fault is not None:
            limit = min(length, fault.after_bytes)
    return StreamingResponse(
        _read_range(stored.local_path, start, length, limit),
        status_code=status,
        headers=headers,
    )


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` -> inclusive (start, end); None if invalid."""
    match = _RANGE.match(header.strip())
    if not match or (match.group(1) == "" and match.group(2) == ""):
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0:
            return None
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def _read_range(path: Path, start: int, length: int, limit: int) -> Iterator[bytes]:
    """Yield ``length`` bytes from ``start``; stop after ``limit`` and break the connection
    (a fault injected by a test: the client sees a body shorter than Content-Length)."""
    sent = 0
    with path.open("rb") as f:
        f.seek(start)
        while sent < limit:
            chunk = f.read(min(_CHUNK, limit - sent))
            if not chunk:
                break
            sent += len(chunk)
            yield chunk
    if sent < length:
        raise ConnectionAbortedError(f"injected fault: connection dropped after {sent} bytes")
