"""The parallel, ranged, resumable fetch against real servers on loopback.

The registry (``cortex registry``) honours ``Range``; two small servers written here stand for
what the registry cannot show: a front that redirects downloads to another origin (a CDN, which
must never see the token) and a plain file server that ignores ``Range`` (answers 200).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cortex_source_huggingface.hub import HubSource
from cortex_source_huggingface.transfer import INCOMPLETE_SUFFIX, PARTS_SUFFIX, TransferSettings

from cortex.source import (
    FetchError,
    ModelSourceId,
    RegistryUnreachableError,
    SourceSettings,
    UnauthorizedError,
)
from cortex.testing.registry import publish_repo

MiB = 1 << 20
CONFIG = b'{"model_type": "llama"}'


def blob_of(size: int, seed: int = 0) -> bytes:
    """Bytes that differ in every MiB (a part written at the wrong offset shows)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    return b"".join(bytes([i % 251]) + block[1:] for i in range(-(-size // MiB)))[:size]


def make_source(
    tmp_path: Path,
    endpoint: str,
    auth_env: str | None = None,
    cache: str = "cache",
    **transfer: Any,
) -> HubSource:
    settings = SourceSettings(
        scheme="mirror",
        endpoint=endpoint,
        auth_env=auth_env,
        cache_dir=tmp_path / cache,
        plugin="huggingface",
    )
    defaults = {"part_bytes": MiB, "retry_wait": 0.01}
    return HubSource(settings, TransferSettings(**{**defaults, **transfer}))


def mid(raw: str) -> ModelSourceId:
    return ModelSourceId.parse(raw)


def gets_of(registry: Any, path_part: str) -> list[Any]:
    return [e for e in registry.request_log.entries() if e.method == "GET" and path_part in e.path]


# ---- plain registry ----------------------------------------------------------------------------


def test_a_large_file_comes_in_parallel_ranges(hf_registry, tmp_path: Path) -> None:
    weights = blob_of(5 * MiB + 123)
    publish_repo(tmp_path / "repos", "acme/big", {"config.json": CONFIG, "w.safetensors": weights})
    registry = hf_registry(tmp_path / "repos")
    source = make_source(tmp_path, registry.url, connections=3)
    snapshot = source.fetch(mid("mirror:acme/big"), ["config.json", "w.safetensors"])
    assert (snapshot / "w.safetensors").read_bytes() == weights
    ranges = sorted(e.range for e in gets_of(registry, "w.safetensors"))
    expected = [f"bytes={i * MiB}-{min(len(weights), (i + 1) * MiB) - 1}" for i in range(6)]
    assert ranges == sorted(expected)
    assert {e.status for e in gets_of(registry, "w.safetensors")} == {206}
    assert not list((tmp_path / "cache").rglob(f"*{INCOMPLETE_SUFFIX}*"))


def test_interrupted_download_is_resumed(hf_registry, tmp_path: Path) -> None:
    big = blob_of(3 * MiB)
    publish_repo(tmp_path / "repos", "acme/big", {"config.json": CONFIG, "model.safetensors": big})
    registry = hf_registry(tmp_path / "repos")
    registry.truncate_next_download("acme/big", "model.safetensors", after_bytes=100_000)
    source = make_source(tmp_path, registry.url, part_bytes=64 * MiB)  # one part
    snapshot = source.fetch(mid("mirror:acme/big"), ["config.json", "model.safetensors"])
    assert (snapshot / "model.safetensors").read_bytes() == big
    gets = gets_of(registry, "model.safetensors")
    assert [e.range for e in gets] == [f"bytes=0-{len(big) - 1}", f"bytes=100000-{len(big) - 1}"]
    assert [e.status for e in gets] == [206, 206]


def test_an_interrupted_process_resumes_with_the_parts_it_finished(
    hf_registry, tmp_path: Path
) -> None:
    """A fetch that gives up keeps what it finished; the next one asks only for the rest, then
    checks the whole file against its sha256."""
    big = blob_of(8 * MiB)
    publish_repo(tmp_path / "repos", "acme/big", {"config.json": CONFIG, "model.safetensors": big})
    registry = hf_registry(tmp_path / "repos")
    for after in (MiB, MiB, MiB, 0, 0):  # parts 0-2 complete, part 3 fails twice in a row
        registry.truncate_next_download("acme/big", "model.safetensors", after_bytes=after)
    source = make_source(tmp_path, registry.url, connections=1, attempts=2)
    model = mid("mirror:acme/big")
    with pytest.raises(RegistryUnreachableError) as caught:
        source.fetch(model, ["config.json", "model.safetensors"])
    assert caught.value.model_id == "mirror:acme/big"
    assert not list((tmp_path / "cache").rglob("snapshots/*/model.safetensors"))
    [partial] = (tmp_path / "cache").rglob(f"*{INCOMPLETE_SUFFIX}")
    record = json.loads(
        partial.with_name(partial.name.replace(INCOMPLETE_SUFFIX, PARTS_SUFFIX)).read_text()
    )
    assert record["done"] == [0, 1, 2]

    registry.request_log.clear()
    snapshot = make_source(tmp_path, registry.url, connections=1).fetch(
        model, ["config.json", "model.safetensors"]
    )
    assert (snapshot / "model.safetensors").read_bytes() == big
    starts = sorted(int(e.range.split("=")[1].split("-")[0]) for e in gets_of(registry, "safet"))
    assert starts == [i * MiB for i in range(3, 8)]
    assert not list((tmp_path / "cache").rglob(f"*{INCOMPLETE_SUFFIX}*"))


def test_a_resumed_file_that_fails_its_sha256_is_downloaded_again(
    hf_registry, tmp_path: Path
) -> None:
    big = blob_of(4 * MiB)
    publish_repo(tmp_path / "repos", "acme/big", {"model.safetensors": big})
    registry = hf_registry(tmp_path / "repos")
    for after in (MiB, 0, 0):
        registry.truncate_next_download("acme/big", "model.safetensors", after_bytes=after)
    source = make_source(tmp_path, registry.url, connections=1, attempts=2)
    model = mid("mirror:acme/big")
    with pytest.raises(RegistryUnreachableError):
        source.fetch(model, ["model.safetensors"])
    [partial] = (tmp_path / "cache").rglob(f"*{INCOMPLETE_SUFFIX}")
    with open(partial, "r+b") as f:  # what a crash between write and record could leave
        f.write(b"\0" * 4096)
    registry.request_log.clear()
    snapshot = source.fetch(model, ["model.safetensors"])
    assert (snapshot / "model.safetensors").read_bytes() == big
    starts = sorted(int(e.range.split("=")[1].split("-")[0]) for e in gets_of(registry, "safet"))
    # parts 1-3, then the sha256 check fails and all four come again
    assert starts == sorted([i * MiB for i in range(1, 4)] + [i * MiB for i in range(4)])


@pytest.mark.slow  # the retries wait between attempts
def test_a_failed_download_leaves_nothing_a_load_would_trust(hf_registry, tmp_path: Path) -> None:
    weights = bytes(range(256)) * 64
    publish_repo(
        tmp_path / "repos", "acme/dense", {"config.json": CONFIG, "w.safetensors": weights}
    )
    registry = hf_registry(tmp_path / "repos")
    for _ in range(7):  # more than the attempts of one part
        registry.truncate_next_download("acme/dense", "w.safetensors", after_bytes=0)
    source = make_source(tmp_path, registry.url, retry_wait=0.2)
    model = mid("mirror:acme/dense")
    with pytest.raises((FetchError, RegistryUnreachableError)) as caught:
        source.fetch(model, ["config.json", "w.safetensors"])
    assert caught.value.model_id == "mirror:acme/dense"
    assert not list((tmp_path / "cache").rglob("w.safetensors"))
    registry.state.truncations.clear()
    snapshot = source.fetch(model, ["config.json", "w.safetensors"])
    assert (snapshot / "w.safetensors").read_bytes() == weights


# ---- the cache is huggingface_hub's ----------------------------------------------------------


def _tree(root: Path) -> dict[str, Any]:
    """Every entry of a cache below ``models--*``: symlink targets, file bytes and modes."""
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".locks") or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        else:
            found[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o777)
    return found


def test_the_cache_is_the_one_hf_hub_download_writes(hf_registry, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

    files = {
        "config.json": CONFIG,
        "model-00001-of-00002.safetensors": blob_of(3 * MiB + 7, seed=1),
        "model-00002-of-00002.safetensors": blob_of(2 * MiB, seed=2),
        "tokenizer.json": b"{}",
        "sub/extra.json": b'{"x": 1}',
    }
    publish_repo(tmp_path / "repos", "acme/sharded", files)
    registry = hf_registry(tmp_path / "repos")
    source = make_source(tmp_path, registry.url, cache="ours")
    model = mid("mirror:acme/sharded")
    revision = source.preflight(model).revision
    ours = source.fetch(model, list(files), revision=revision)

    for name in files:  # huggingface_hub, offline, reads what we wrote
        path = hf_hub_download(
            "acme/sharded",
            name,
            revision=revision,
            cache_dir=tmp_path / "ours",
            local_files_only=True,
        )
        assert Path(path) == ours / name
        assert Path(path).read_bytes() == files[name]
    offline = snapshot_download(
        "acme/sharded", cache_dir=tmp_path / "ours", local_files_only=True, token=False
    )
    assert Path(offline) == ours  # refs/main names the commit
    info = scan_cache_dir(tmp_path / "ours")
    assert not info.warnings
    [repo] = info.repos
    assert repo.repo_id == "acme/sharded"
    assert repo.size_on_disk == sum(len(b) for b in files.values())
    assert not info.incomplete_files

    for name in files:  # and byte for byte, entry for entry, what huggingface_hub writes
        hf_hub_download(
            "acme/sharded",
            name,
            revision=revision,
            endpoint=registry.url,
            cache_dir=tmp_path / "theirs",
            token=False,
        )
    (tmp_path / "theirs" / "models--acme--sharded" / "refs").mkdir(exist_ok=True)
    (tmp_path / "theirs" / "models--acme--sharded" / "refs" / "main").write_text(revision)
    assert _tree(tmp_path / "ours") == _tree(tmp_path / "theirs")


def test_what_hf_hub_download_cached_is_not_fetched_again(hf_registry, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    weights = blob_of(2 * MiB)
    publish_repo(
        tmp_path / "repos", "acme/dense", {"config.json": CONFIG, "w.safetensors": weights}
    )
    registry = hf_registry(tmp_path / "repos")
    source = make_source(tmp_path, registry.url)
    model = mid("mirror:acme/dense")
    revision = source.preflight(model).revision
    hf_hub_download(
        "acme/dense", "w.safetensors", revision=revision, endpoint=registry.url,
        cache_dir=tmp_path / "cache", token=False,
    )  # fmt: skip
    registry.request_log.clear()
    snapshot = source.fetch(model, ["config.json", "w.safetensors"])
    assert (snapshot / "w.safetensors").read_bytes() == weights
    assert gets_of(registry, "w.safetensors") == []


# ---- servers the registry cannot stand for ---------------------------------------------------


class Served:
    """What a test server saw: requests (path, Authorization, Range), peak concurrency."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def file_server(
    files: dict[str, bytes], served: Served, ranges: bool, delay: float = 0.0, busy: int = 0
) -> type[http.server.BaseHTTPRequestHandler]:
    """Serves ``files`` by path (``/x.bin``), with or without ``Range``; the first ``busy``
    requests get a 503."""
    refusals = [busy]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with served.lock:
                served.requests.append(
                    ("GET", self.path, self.headers.get("Authorization"), self.headers.get("Range"))
                )
                served.in_flight += 1
                served.peak = max(served.peak, served.in_flight)
            try:
                with served.lock:
                    refuse, refusals[0] = refusals[0] > 0, max(0, refusals[0] - 1)
                if refuse:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                start, end, status = 0, len(body) - 1, 200
                wanted = self.headers.get("Range")
                if ranges and wanted:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, end, status = int(first), int(last) if last else len(body) - 1, 206
                self.send_response(status)
                self.send_header("Content-Length", str(end - start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                for offset in range(start, end + 1, 256 * 1024):
                    self.wfile.write(body[offset : min(end + 1, offset + 256 * 1024)])
                    if delay:
                        time.sleep(delay)
            finally:
                with served.lock:
                    served.in_flight -= 1

    return Handler


COMMIT = "c" * 40


def front_server(
    files: dict[str, bytes], cdn: str, token: str, served: Served, size: int | None = None
) -> type[http.server.BaseHTTPRequestHandler]:
    """The source's endpoint: checks the token, answers ``resolve`` with a redirect to ``cdn``
    (as huggingface.co does for LFS files), with the headers huggingface_hub needs."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            served.requests.append(
                (self.command, self.path, self.headers.get("Authorization"), None)
            )
            if self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            name = self.path.split("/resolve/", 1)[1].split("/", 1)[1]
            body = files[f"/{name}"]
            self.send_response(302)
            self.send_header("Location", f"{cdn}/{name}?signature=s3cr3t")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("X-Linked-Size", str(size if size is not None else len(body)))
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = _answer
        do_GET = _answer

    return Handler


@pytest.fixture
def servers() -> Iterator[Any]:
    started: list[Iterator[str]] = []

    def start(handler: type[http.server.BaseHTTPRequestHandler]) -> str:
        gen = serve(handler)
        started.append(gen)
        return next(gen)

    yield start
    for gen in started:
        for _ in gen:
            pass


def test_the_token_goes_to_the_source_and_never_to_the_cdn(
    servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"/config.json": CONFIG, "/w.safetensors": blob_of(3 * MiB)}
    token = "tok-ONLY-FOR-THE-SOURCE"
    cdn_seen, front_seen = Served(), Served()
    cdn = servers(file_server(files, cdn_seen, ranges=True))
    front = servers(front_server(files, cdn, token, front_seen))
    monkeypatch.setenv("MIRROR_TOKEN", token)
    source = make_source(tmp_path, front, auth_env="MIRROR_TOKEN")
    snapshot = source.fetch(
        mid("mirror:acme/cdn"), ["config.json", "w.safetensors"], revision=COMMIT
    )
    assert (snapshot / "w.safetensors").read_bytes() == files["/w.safetensors"]
    assert front_seen.requests and all(r[2] == f"Bearer {token}" for r in front_seen.requests)
    assert len([r for r in cdn_seen.requests if "w.safetensors" in r[1]]) == 3  # three parts
    assert all(r[2] is None for r in cdn_seen.requests)


def test_a_server_that_ignores_range_gets_one_plain_request(
    servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"/w.safetensors": blob_of(4 * MiB + 5)}
    cdn_seen, front_seen = Served(), Served()
    cdn = servers(file_server(files, cdn_seen, ranges=False))
    monkeypatch.setenv("MIRROR_TOKEN", "t")
    front = servers(front_server(files, cdn, "t", front_seen))
    source = make_source(tmp_path, front, auth_env="MIRROR_TOKEN")
    snapshot = source.fetch(mid("mirror:acme/plain"), ["w.safetensors"], revision=COMMIT)
    assert (snapshot / "w.safetensors").read_bytes() == files["/w.safetensors"]
    assert [r[3] for r in cdn_seen.requests] == [f"bytes=0-{MiB - 1}"]  # answered with 200


def test_connections_are_bounded_across_files(
    servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"/model-0000{i}-of-00004.safetensors": blob_of(2 * MiB, seed=i) for i in range(1, 5)}
    cdn_seen, front_seen = Served(), Served()
    cdn = servers(file_server(files, cdn_seen, ranges=True, delay=0.01))
    monkeypatch.setenv("MIRROR_TOKEN", "t")
    front = servers(front_server(files, cdn, "t", front_seen))
    source = make_source(tmp_path, front, auth_env="MIRROR_TOKEN", connections=3)
    names = [name.lstrip("/") for name in files]
    snapshot = source.fetch(mid("mirror:acme/sharded"), names, revision=COMMIT)
    for name in names:
        assert (snapshot / name).read_bytes() == files[f"/{name}"]
    assert len(cdn_seen.requests) == 8  # 4 files x 2 parts
    assert cdn_seen.peak == 3


def test_a_file_larger_than_the_free_disk_is_refused_before_any_download(
    servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"/w.safetensors": b"x" * 10}
    cdn_seen, front_seen = Served(), Served()
    cdn = servers(file_server(files, cdn_seen, ranges=True))
    monkeypatch.setenv("MIRROR_TOKEN", "t")
    front = servers(front_server(files, cdn, "t", front_seen, size=1 << 60))
    source = make_source(tmp_path, front, auth_env="MIRROR_TOKEN")
    with pytest.raises(FetchError) as caught:
        source.fetch(mid("mirror:acme/huge"), ["w.safetensors"], revision=COMMIT)
    assert caught.value.to_json()["kind"] == "fetch_failed"
    assert "free" in caught.value.message
    assert cdn_seen.requests == []


def test_a_download_the_source_refuses_is_unauthorized(servers, tmp_path: Path) -> None:
    files = {"/w.safetensors": b"x" * 10}
    cdn_seen, front_seen = Served(), Served()
    cdn = servers(file_server(files, cdn_seen, ranges=True))
    front = servers(front_server(files, cdn, "needs-a-token", front_seen))
    source = make_source(tmp_path, front, auth_env="MIRROR_TOKEN")
    with pytest.raises(UnauthorizedError) as caught:
        source.fetch(mid("mirror:acme/private"), ["w.safetensors"], revision=COMMIT)
    assert "$MIRROR_TOKEN" in caught.value.message
    assert cdn_seen.requests == []


def test_a_busy_server_is_asked_again(
    servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"/w.safetensors": blob_of(MiB + 3)}
    cdn_seen, front_seen = Served(), Served()
    cdn = servers(file_server(files, cdn_seen, ranges=True, busy=2))
    monkeypatch.setenv("MIRROR_TOKEN", "t")
    front = servers(front_server(files, cdn, "t", front_seen))
    source = make_source(tmp_path, front, auth_env="MIRROR_TOKEN", connections=1)
    snapshot = source.fetch(mid("mirror:acme/busy"), ["w.safetensors"], revision=COMMIT)
    assert (snapshot / "w.safetensors").read_bytes() == files["/w.safetensors"]
    assert len(cdn_seen.requests) == 2 + 2  # two 503s, then the two parts

    forever = Served()
    cdn = servers(file_server(files, forever, ranges=True, busy=100))
    front = servers(front_server(files, cdn, "t", Served()))
    source = make_source(tmp_path, front, auth_env="MIRROR_TOKEN", cache="other", attempts=3)
    with pytest.raises(RegistryUnreachableError) as caught:
        source.fetch(mid("mirror:acme/busy"), ["w.safetensors"], revision=COMMIT)
    assert caught.value.details["status"] == 503
    assert len(forever.requests) == 3
