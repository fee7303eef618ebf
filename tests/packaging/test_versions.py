"""One version for every distribution.

The root ``pyproject.toml`` holds the reference version; ``make version V=x.y.z`` rewrites it in
all five pyprojects. Reading one shared file from each pyproject (setuptools' dynamic
``version = {file = ...}``) does not survive an sdist for the plugins, whose project folder cannot
reach a file above it, so the versions are written out and this test keeps them equal.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

import cortex

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {
    "cortex": ROOT,
    "cortex-source-huggingface": ROOT / "plugins" / "source_huggingface",
    "cortex-source-helexa": ROOT / "plugins" / "source_helexa",
    "cortex-harness-torch": ROOT / "plugins" / "harness_torch",
    "cortex-harness-llamacpp": ROOT / "plugins" / "harness_llamacpp",
}


def project_table(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())["project"]


def reference_version() -> str:
    return project_table(ROOT)["version"]


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_every_distribution_has_the_reference_version(name: str) -> None:
    project = project_table(DISTRIBUTIONS[name])
    assert project["name"] == name
    assert project["version"] == reference_version(), (
        f"{name} is at {project['version']}, cortex at {reference_version()}: "
        "run `make version V=...`"
    )


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_installed_metadata_follows_the_pyproject(name: str) -> None:
    """A stale editable install reports an old version in `cortex plugins`: reinstall."""
    assert version(name) == reference_version()


def test_cortex_reports_the_reference_version() -> None:
    assert cortex.__version__ == reference_version()


def test_make_dist_builds_exactly_these_distributions() -> None:
    makefile = (ROOT / "Makefile").read_text()
    plugins = re.search(r"^PLUGINS := (.+)$", makefile, re.MULTILINE)
    assert plugins is not None
    assert re.search(r"^DISTRIBUTIONS := \. \$\(PLUGINS\)$", makefile, re.MULTILINE)
    listed = {ROOT, *(ROOT / p for p in plugins.group(1).split())}
    assert listed == set(DISTRIBUTIONS.values())


def test_plugin_new_knows_the_shipped_distributions() -> None:
    """`cortex plugin new` refuses to generate a skeleton that would replace one of these."""
    from cortex.cli.plugin_new import SHIPPED_DISTRIBUTIONS

    assert {"cortex", *SHIPPED_DISTRIBUTIONS} == set(DISTRIBUTIONS)
