"""Paths a registry must answer in its own error shape (issue 22): never a 500, never a dropped
connection, never the framework's bare 404, and a symlink loop costs nothing."""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cortex.testing.registry import publish_repo


def raw_get(url: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request with ``path`` sent exactly as written (http.client does not normalise it);
    a dropped connection raises."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


@pytest.fixture
def registry(tmp_path: Path, hf_registry):
    root = tmp_path / "repos"
    publish_repo(root, "acme/tiny", {"config.json": b"{}", "caf\u00e9 \u2026.txt": b"unicode"})
    return hf_registry(root)


def assert_registry_error(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert 400 <= status < 500, (status, body[:200])
    assert headers["content-type"] == "application/json"
    assert headers["x-error-message"].isascii()
    return json.loads(body)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/models/acme/%E2%80%A6", 404, "RepoNotFound"),
        ("/api/models/%E2%80%A6/x", 404, "RepoNotFound"),
        ("/api/models/acme/tiny/revision/%E2%80%A6", 404, "RevisionNotFound"),
        ("/acme/tiny/resolve/%E2%80%A6/config.json", 404, "RevisionNotFound"),
        ("/acme/tiny/resolve/main/%E2%80%A6.txt", 404, "EntryNotFound"),
        ("/api/models/acme/tiny/tree/main/%E2%80%A6", 404, "EntryNotFound"),
        ("/acme/tiny/resolve/main/a%00b", 400, None),
        ("/acme/tiny/resolve/main/a%0D%0Ab", 400, None),
        ("/api/models/acme/ti%0Any", 404, "RepoNotFound"),
        ("/api/models/acme/tiny%0D%0AX-Injected:%201", 404, "RepoNotFound"),
        ("/api/models/acme/%00", 404, "RepoNotFound"),
        ("/%0A", 404, None),
        ("/api/%0D%0A", 404, None),
    ],
)
def test_odd_paths_get_the_registry_error_shape(registry, path: str, status: int, code) -> None:
    for method in ("GET", "HEAD"):
        got, headers, body = raw_get(registry.url, path, method)
        assert got == status, (method, path, got, body[:200])
        assert headers.get("x-error-code") == code, headers
        assert "x-injected" not in headers
        if method == "GET":
            assert "error" in assert_registry_error(got, headers, body)


def test_a_unicode_file_name_is_served(registry) -> None:
    from urllib.parse import quote

    path = "/acme/tiny/resolve/main/" + quote("caf\u00e9 \u2026.txt")
    status, _headers, body = raw_get(registry.url, path)
    assert status == 200 and body == b"unicode", (status, body)
    info = json.loads(raw_get(registry.url, "/api/models/acme/tiny")[2])
    assert "caf\u00e9 \u2026.txt" in {s["rfilename"] for s in info["siblings"]}


def test_a_symlink_loop_is_cheap_and_not_an_error(tmp_path: Path, hf_registry) -> None:
    root = tmp_path / "repos"
    repo = publish_repo(root, "acme/loop", {"config.json": b"{}", "sub/w.bin": b"w"})
    os.symlink("..", repo / "sub" / "up")  # sub/up -> the repo itself: a loop
    os.symlink(".", repo / "self")
    (repo / "a").mkdir()
    (repo / "b").mkdir()
    os.symlink("../b", repo / "a" / "to-b")  # a/to-b -> b, b/to-a -> a: a loop of two links
    os.symlink("../a", repo / "b" / "to-a")
    (repo / "b" / "x.txt").write_bytes(b"x")
    registry = hf_registry(root)
    started = time.process_time()
    status, _headers, body = raw_get(registry.url, "/api/models/acme/loop")
    assert status == 200, body[:300]
    names = {s["rfilename"] for s in json.loads(body)["siblings"]}
    # a/to-b leads to b, which the scan reaches (and lists) as b itself: listed once.
    assert names == {"config.json", "sub/w.bin", "b/x.txt"}
    assert time.process_time() - started < 2.0


def test_a_diamond_of_links_is_walked_once_per_directory(tmp_path: Path, hf_registry) -> None:
    # d0/{l,r} -> d1, d1/{l,r} -> d2, ...: no loop, but 2**depth paths to the bottom. Each
    # directory used to be walked once per path (depth 12: seconds of CPU per request, 4096
    # listed copies of one file); now once, so the answer is small and quick.
    root = tmp_path / "repos"
    repo = publish_repo(root, "acme/dag", {"config.json": b"{}"})
    depth = 12  # 4096 paths to the bottom
    for level in range(depth + 1):
        (repo / f"d{level}").mkdir()
    for level in range(depth):
        for side in ("l", "r"):
            os.symlink(f"../d{level + 1}", repo / f"d{level}" / side)
    (repo / f"d{depth}" / "leaf.txt").write_bytes(b"leaf")
    registry = hf_registry(root)
    status, _headers, body = raw_get(registry.url, "/api/models/acme/dag")
    assert status == 200, body[:300]
    names = {s["rfilename"] for s in json.loads(body)["siblings"]}
    assert names == {"config.json", f"d{depth}/leaf.txt"}
