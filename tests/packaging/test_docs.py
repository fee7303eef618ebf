"""The plugin-author and deployment guides stay true to the code they quote and the files they
name: every code block marked ``<!-- from PATH -->`` must appear verbatim in PATH, and every
relative link must lead to a file that exists."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ["plugin-authors.md", "deploy.md"]
QUOTED_BLOCK = re.compile(r"<!-- from (?P<path>\S+) -->\n```[a-z]*\n(?P<code>.*?)\n```", re.DOTALL)
RELATIVE_LINK = re.compile(r"\]\((?!https?:|#|mailto:)(?P<target>[^)#\s]+)")


def quoted_blocks() -> list[tuple[str, str, str]]:
    blocks = []
    for guide in GUIDES:
        text = (ROOT / "docs" / guide).read_text()
        blocks += [(guide, m["path"], m["code"]) for m in QUOTED_BLOCK.finditer(text)]
    return blocks


def test_the_tutorial_quotes_code() -> None:
    assert len([b for b in quoted_blocks() if b[0] == "plugin-authors.md"]) >= 6


@pytest.mark.parametrize(
    ("guide", "path", "code"), quoted_blocks(), ids=lambda v: v if "\n" not in v else "code"
)
def test_quoted_code_matches_the_file(guide: str, path: str, code: str) -> None:
    # Compared dedented: a method quoted on its own is dedented by ruff's Markdown formatting.
    wanted = textwrap.dedent(code).splitlines()
    lines = (ROOT / path).read_text().splitlines()
    windows = (lines[i : i + len(wanted)] for i in range(len(lines) - len(wanted) + 1))
    assert any(textwrap.dedent("\n".join(w)).splitlines() == wanted for w in windows), (
        f"{guide}: a block quoted from {path} no longer matches it"
    )


@pytest.mark.parametrize("guide", GUIDES)
def test_relative_links_resolve(guide: str) -> None:
    text = (ROOT / "docs" / guide).read_text()
    for match in RELATIVE_LINK.finditer(text):
        target = (ROOT / "docs" / match["target"]).resolve()
        assert target.exists(), f"{guide} links to {match['target']}, which does not exist"


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_is_linked_from_the_index(guide: str) -> None:
    assert f"]({guide})" in (ROOT / "docs" / "index.md").read_text()
