"""The registry speaks the HF wire format: huggingface_hub 2.4 works against it unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from cortex.registry.store import commit_sha
from cortex.testing.registry import publish_repo

WEIGHTS = bytes(range(256)) * 40  # 10 KiB


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    publish_repo(
        root,
        "acme/tiny",
        {
            "config.json": b'{"model_type": "llama"}',
            "model.safetensors": WEIGHTS,
            "sub/dir/notes.txt": "hello",
        },
    )
    publish_repo(root, "acme/tiny", {"config.json": b'{"v": 2}'}, revision="refs/pr/1")
    return root


def test_model_info_has_sha_and_sizes(repos: Path, hf_registry) -> None:
    from huggingface_hub import HfApi

    registry = hf_registry(repos)
    info = HfApi(endpoint=registry.url).model_info("acme/tiny", files_metadata=True, token=False)
    assert len(info.sha) == 40 and all(c in "0123456789abcdef" for c in info.sha)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {"config.json": 23, "model.safetensors": len(WEIGHTS), "sub/dir/notes.txt": 5}


def test_sha_is_deterministic_and_changes_with_content(repos: Path, hf_registry) -> None:
    registry = hf_registry(repos)
    first = httpx.get(f"{registry.url}/api/models/acme/tiny").json()["sha"]
    assert httpx.get(f"{registry.url}/api/models/acme/tiny").json()["sha"] == first
    publish_repo(repos, "acme/tiny", {"config.json": b'{"model_type": "qwen2"}'})
    assert httpx.get(f"{registry.url}/api/models/acme/tiny").json()["sha"] != first
    assert commit_sha(()) == commit_sha(())


def test_hf_hub_download_and_snapshot(repos: Path, hf_registry, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    registry = hf_registry(repos)
    cache = tmp_path / "cache"
    path = hf_hub_download(
        "acme/tiny", "model.safetensors", endpoint=registry.url, cache_dir=cache, token=False
    )
    assert Path(path).read_bytes() == WEIGHTS
    # the blob is named by the ETag (sha256), as huggingface_hub does for LFS files
    assert Path(path).resolve().name == hashlib.sha256(WEIGHTS).hexdigest()
    snapshot = snapshot_download("acme/tiny", endpoint=registry.url, cache_dir=cache, token=False)
    assert (Path(snapshot) / "sub/dir/notes.txt").read_text() == "hello"


def test_revision_with_slashes(repos: Path, hf_registry, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    registry = hf_registry(repos)
    api = HfApi(endpoint=registry.url)
    info = api.model_info("acme/tiny", revision="refs/pr/1", token=False)
    assert [s.rfilename for s in info.siblings] == ["config.json"]
    path = hf_hub_download(
        "acme/tiny",
        "config.json",
        revision="refs/pr/1",
        endpoint=registry.url,
        cache_dir=tmp_path / "c",
        token=False,
    )
    assert Path(path).read_bytes() == b'{"v": 2}'
    # a revision can also be asked for by its commit sha
    by_sha = api.model_info("acme/tiny", revision=info.sha, token=False)
    assert by_sha.sha == info.sha


def test_typed_errors(repos: Path, hf_registry, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    registry = hf_registry(repos)
    api = HfApi(endpoint=registry.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/missing", token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/tiny", revision="nope", token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            "acme/tiny", "nope.bin", endpoint=registry.url, cache_dir=tmp_path, token=False
        )


def test_tree_listing(repos: Path, hf_registry) -> None:
    from huggingface_hub import HfApi

    registry = hf_registry(repos)
    api = HfApi(endpoint=registry.url)
    flat = {e.path for e in api.list_repo_tree("acme/tiny", token=False)}
    assert flat == {"config.json", "model.safetensors", "sub"}
    deep = {e.path for e in api.list_repo_tree("acme/tiny", recursive=True, token=False)}
    assert {"sub/dir/notes.txt", "sub/dir", "sub"} <= deep
    under = {e.path for e in api.list_repo_tree("acme/tiny", path_in_repo="sub/dir", token=False)}
    assert under == {"sub/dir/notes.txt"}


def test_head_and_range(repos: Path, hf_registry) -> None:
    registry = hf_registry(repos)
    url = f"{registry.url}/acme/tiny/resolve/main/model.safetensors"
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.headers["etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert head.headers["content-length"] == str(len(WEIGHTS))
    assert len(head.headers["x-repo-commit"]) == 40
    part = httpx.get(url, headers={"Range": "bytes=100-"})
    assert part.status_code == 206
    assert part.content == WEIGHTS[100:]
    assert part.headers["content-range"] == f"bytes 100-{len(WEIGHTS) - 1}/{len(WEIGHTS)}"
    assert httpx.get(url, headers={"Range": "bytes=0-9"}).content == WEIGHTS[:10]
    assert httpx.get(url, headers={"Range": "bytes=-5"}).content == WEIGHTS[-5:]
    bad = httpx.get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"})
    assert bad.status_code == 416


def test_path_traversal_is_refused(repos: Path, hf_registry, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT")
    registry = hf_registry(repos)
    for path in (
        "/acme/tiny/resolve/main/..%2F..%2F..%2Fsecret.txt",
        "/acme/tiny/resolve/main/%2E%2E/%2E%2E/secret.txt",
        "/acme/..%2F..%2Fsecret.txt/resolve/main/x",
    ):
        response = httpx.get(registry.url + path)
        assert response.status_code in (400, 404), path
        assert b"TOP-SECRET-CONTENT" not in response.content


def test_bearer_auth(repos: Path, hf_registry, tmp_path: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    registry = hf_registry(repos, token="s3cret-token")
    api = HfApi(endpoint=registry.url)
    with pytest.raises(HfHubHTTPError) as missing:
        api.model_info("acme/tiny", token=False)
    assert missing.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as wrong:
        api.model_info("acme/tiny", token="wrong")
    assert wrong.value.response.status_code == 403
    assert api.model_info("acme/tiny", token="s3cret-token").sha
    assert httpx.get(f"{registry.url}/health").status_code == 200
    sent = [e.authorization for e in registry.request_log.entries() if e.path.startswith("/api")]
    assert sent == [None, "Bearer wrong", "Bearer s3cret-token"]
    assert "s3cret" not in repr(registry.request_log.entries())


def test_read_only(repos: Path, hf_registry) -> None:
    registry = hf_registry(repos)
    response = httpx.post(f"{registry.url}/api/models/acme/tiny", json={})
    assert response.status_code == 405
    assert "error" in response.json()


def test_hidden_folders_are_not_repos(repos: Path, hf_registry) -> None:
    (repos / ".cache" / "x").mkdir(parents=True)
    (repos / ".cache" / "x" / "config.json").write_text("{}")
    (repos / "acme" / ".git").mkdir()
    registry = hf_registry(repos)
    assert httpx.get(f"{registry.url}/api/models/.cache/x").status_code == 404
    assert httpx.get(f"{registry.url}/api/models/acme/.git").status_code == 404
    assert [r["id"] for r in httpx.get(f"{registry.url}/api/models").json()] == ["acme/tiny"]


def test_request_log_is_bounded() -> None:
    from cortex.registry.requestlog import LoggedRequest, RequestLog

    log = RequestLog(capacity=3)
    for i in range(5):
        log.append(LoggedRequest("GET", f"/{i}", "", None, None, 200))
    assert [e.path for e in log.entries()] == ["/2", "/3", "/4"]
