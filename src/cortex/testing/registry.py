"""Publish repos into a directory and serve them through a real HF-compatible registry.

Every test that downloads a model goes through this: publish files, start a registry on
loopback, point a source (or huggingface_hub itself) at ``registry.url``. API::

    from cortex.testing.registry import publish_repo, start_registry

    publish_repo(root, "acme/tiny", {"config.json": b"{}", "model.safetensors": path_or_bytes})
    publish_repo(root, "acme/tiny", saved_model_dir)            # copy a whole directory
    publish_repo(root, "acme/tiny", {...}, revision="v2")        # an extra revision
    with start_registry(root, token="s3cret") as registry:       # token optional
        registry.url            # http://127.0.0.1:PORT
        registry.request_log    # cortex.registry.requestlog.RequestLog (entries(), clear())
        registry.truncate_next_download("acme/tiny", "model.safetensors", after_bytes=100)

In pytest, the ``hf_registry`` fixture (cortex.testing.fixtures) is a factory that starts a
registry per call and stops them all when the test ends::

    def test_x(hf_registry, tmp_path):
        publish_repo(tmp_path / "repos", "acme/tiny", {...})
        registry = hf_registry(tmp_path / "repos", token=None)

The registry re-reads the directory on every request, so publishing after start works.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import attrs

from cortex.registry.app import RegistryState, create_app
from cortex.registry.requestlog import RequestLog
from cortex.registry.store import MAIN, revision_dir_name
from cortex.testing.servers import UvicornThread

FileContent = bytes | str | Path


def publish_repo(
    root: Path,
    repo_id: str,
    files: Mapping[str, FileContent] | Path,
    revision: str = MAIN,
) -> Path:
    """Write ``files`` as repo ``org/name`` (at ``revision``) under ``root``; returns its folder.

    ``files`` maps repo-relative paths to bytes, text or a local file to copy; or it is a local
    directory whose whole content is copied (e.g. what ``save_pretrained`` wrote). Publishing
    again into the same revision adds or replaces files.
    """
    org, _, name = repo_id.partition("/")
    if not org or not name or "/" in name:
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    folder = Path(root) / org / revision_dir_name(name, revision)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(files, Path):
        if not files.is_dir():
            raise ValueError(f"{files} is not a directory")
        shutil.copytree(files, folder, dirs_exist_ok=True)
        return folder
    for relative, content in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        elif isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)
    return folder


@attrs.define
class RunningRegistry:
    """A registry running in this process on ``127.0.0.1:<random port>``."""

    url: str
    root: Path
    state: RegistryState
    server: UvicornThread

    @property
    def request_log(self) -> RequestLog:
        return self.state.request_log

    def truncate_next_download(self, repo_id: str, path: str, after_bytes: int) -> None:
        """Make the next GET of ``path`` drop its connection after ``after_bytes`` bytes."""
        self.state.truncate_next_download(repo_id, path, after_bytes)

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> RunningRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_registry(root: Path, token: str | None = None) -> RunningRegistry:
    """Start a registry serving ``root`` (created if missing); stop it with ``.stop()``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    app = create_app(root, token=token)
    server = UvicornThread(app).start()
    return RunningRegistry(url=server.url, root=root, state=app.state.registry, server=server)
