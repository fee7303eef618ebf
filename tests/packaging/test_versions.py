"""One version for every distribution, from one place: the ``VERSION`` file.

The root ``pyproject.toml`` reads it through setuptools' dynamic ``version = {file = "VERSION"}``.
A plugin's pyproject cannot name ``../../VERSION`` (setuptools refuses a file outside the project
folder: "Cannot access ... (or anything outside ...)"), so each plugin folder holds ``VERSION``
as a symlink to the root file, which an sdist stores as a plain file. ``make version V=x.y.z``
writes the file.
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
    "cortex-harness-vllm": ROOT / "plugins" / "harness_vllm",
}


def project_table(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())


def the_version() -> str:
    return (ROOT / "VERSION").read_text().strip()


def test_version_file_holds_one_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d+)?", the_version())


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_every_distribution_reads_the_version_file(name: str) -> None:
    folder = DISTRIBUTIONS[name]
    table = project_table(folder)
    assert table["project"]["name"] == name
    assert "version" not in table["project"], f"{name} pins a version of its own"
    assert "version" in table["project"].get("dynamic", [])
    assert table["tool"]["setuptools"]["dynamic"]["version"] == {"file": "VERSION"}
    version_file = folder / "VERSION"
    assert version_file.resolve() == (ROOT / "VERSION").resolve()
    if folder != ROOT:
        assert version_file.is_symlink(), f"{version_file} must link to the root VERSION"


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_installed_metadata_follows_the_version_file(name: str) -> None:
    """A stale install reports an old version in `cortex plugins`: run `make venv`."""
    assert version(name) == the_version()


def test_cortex_reports_the_version() -> None:
    assert cortex.__version__ == the_version()


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
