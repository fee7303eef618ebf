"""Any path, any method: the registry answers in its own shape, never a 5xx or a dropped
connection (derandomized in ``make test``; ``make fuzz`` draws many more at random)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cortex.testing.fuzz import examples
from cortex.testing.registry import RunningRegistry, publish_repo, start_registry

from .test_registry_paths import raw_get


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    root = tmp_path_factory.mktemp("repos")
    publish_repo(root, "acme/tiny", {"config.json": b"{}", "sub/w.bin": b"w" * 100})
    publish_repo(root, "acme/tiny", {"config.json": b"{}"}, revision="refs/pr/1")
    running = start_registry(root)
    yield running
    running.stop()


# Segments near the routes (so the fuzzer reaches the handlers) and arbitrary text.
segment = st.one_of(
    st.sampled_from(["api", "models", "acme", "tiny", "resolve", "tree", "revision", "main"]),
    st.sampled_from(["refs%2Fpr%2F1", "config.json", "sub", "w.bin", "..", ".", "", "%2e%2e"]),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
    st.text(alphabet="%0123456789ABCDEFaz./\\", max_size=8),
)
paths = st.lists(segment, min_size=1, max_size=7).map(lambda parts: "/" + "/".join(parts))


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=paths, method=st.sampled_from(["GET", "HEAD", "POST"]))
@example(path="/api/models/acme/%E2%80%A6", method="GET")
@example(path="/acme/tiny/resolve/main/a%00b", method="GET")
@example(path="/acme/tiny/resolve/main/%0D%0A", method="HEAD")
def test_every_path_gets_an_answer_in_the_registry_shape(
    registry: RunningRegistry, path: str, method: str
) -> None:
    status, headers, body = raw_get(registry.url, path, method)
    assert status < 500, (method, path, status, body[:200])
    if status >= 400 and status != 416:
        assert headers["x-error-message"].isascii()
        if method != "HEAD":
            assert "error" in json.loads(body)


def test_the_fixture_registry_serves(registry: RunningRegistry) -> None:
    status, _headers, body = raw_get(registry.url, "/acme/tiny/resolve/main/sub/w.bin")
    assert status == 200 and body == b"w" * 100
    assert Path(registry.root, "acme", "tiny").is_dir()
