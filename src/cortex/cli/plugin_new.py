"""``cortex plugin new NAME --kind source|harness|eviction``: a working plugin skeleton.

The skeleton is a complete distribution (pyproject with the ``cortex`` entry point, the module
with the ``@hookimpl``, a passing test) so a plugin author starts from something that installs,
shows up in ``cortex plugins`` and passes its tests, then changes it step by step. Templates live
in ``cortex/templates/plugin/`` as package data: ``common/`` for every kind plus one folder per
kind. Placeholders are plain ``__UPPER__`` tokens in file contents and paths, replaced verbatim,
because Python code is full of the braces and dollars that template engines would trip on.
"""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import attrs
import click

from cortex import __version__

KINDS: dict[str, str] = {"source": "source", "harness": "harness", "eviction": "strategy"}
"""Plugin kind -> the name of the module that holds the implementation."""

TEMPLATE_SUFFIX = ".tmpl"
_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_MAX_NAME = 30


SHIPPED_DISTRIBUTIONS = frozenset(
    {
        "cortex-source-huggingface",
        "cortex-source-helexa",
        "cortex-harness-torch",
        "cortex-harness-llamacpp",
        "cortex-harness-vllm",
    }
)
"""Distributions cortex ships: a skeleton with one of these names would replace it on install."""


class PluginNameError(ValueError):
    """A NAME that cannot become a scheme, an entry point and a Python package."""


def check_plugin_name(name: str) -> str:
    """Lower-case letters, digits and single hyphens, starting with a letter: the name is used
    as a scheme (``name:org/model``), an entry point, a distribution and a package name."""
    if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
        raise PluginNameError(
            f"{name!r} is not a valid plugin name: use lower-case letters, digits and single "
            f"hyphens, starting with a letter, at most {_MAX_NAME} characters (e.g. 'my-store')"
        )
    return name


@attrs.frozen
class PluginNames:
    """Every name a generated plugin needs, derived from NAME and the kind."""

    name: str
    kind: str

    @property
    def distribution(self) -> str:
        return f"cortex-{self.kind}-{self.name}"

    @property
    def package(self) -> str:
        return self.distribution.replace("-", "_")

    @property
    def entry_point(self) -> str:
        return f"{self.kind}-{self.name}"

    @property
    def class_prefix(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("-"))

    @property
    def module(self) -> str:
        return KINDS[self.kind]

    def tokens(self) -> dict[str, str]:
        major_minor = ".".join(__version__.split(".")[:2])
        return {
            "__DIST__": self.distribution,
            "__PACKAGE__": self.package,
            "__ENTRY__": self.entry_point,
            "__CLASS__": self.class_prefix,
            "__MODULE__": self.module,
            "__KIND__": self.kind,
            "__NAME__": self.name,
            "__ENV__": self.name.replace("-", "_").upper(),
            "__CORTEX_VERSION__": major_minor,
        }


def _substitute(text: str, tokens: dict[str, str]) -> str:
    for token, value in tokens.items():
        text = text.replace(token, value)
    return text


def _walk(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    """(relative path, file) for every template file under ``folder``."""
    found: list[tuple[str, Traversable]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        relative = f"{prefix}{entry.name}"
        if entry.is_dir():
            found.extend(_walk(entry, relative + "/"))
        elif entry.name.endswith(TEMPLATE_SUFFIX):
            found.append((relative, entry))
    return found


def template_root() -> Traversable:
    return files("cortex").joinpath("templates", "plugin")


def render_plugin(names: PluginNames, parent: Path) -> Path:
    """Write the skeleton into ``parent/<distribution>`` and return that folder.

    Refuses to touch an existing non-empty folder: overwriting someone's plugin to give them a
    skeleton would be the worst possible start.
    """
    if names.kind not in KINDS:
        raise ValueError(f"unknown plugin kind {names.kind!r} (choose from {', '.join(KINDS)})")
    target = parent / names.distribution
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} already exists and is not empty")
    tokens = names.tokens()
    root = template_root()
    for folder in ("common", names.kind):
        for relative, template in _walk(root.joinpath(folder)):
            path = target / _substitute(relative[: -len(TEMPLATE_SUFFIX)], tokens)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_substitute(template.read_text(encoding="utf-8"), tokens))
    return target


@click.group("plugin")
def plugin_group() -> None:
    """Create cortex plugins.

    Example: cortex plugin new my-store --kind source
    """


@plugin_group.command("new")
@click.argument("name")
@click.option(
    "--kind",
    type=click.Choice(sorted(KINDS)),
    required=True,
    help="What the plugin provides: a model source, a harness or an eviction strategy.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to create the plugin's folder (cortex-KIND-NAME).",
)
def new(name: str, kind: str, directory: Path) -> None:
    """Create a working plugin skeleton: a distribution with the entry point, the hook
    implementation and a passing test.

    \b
    Example:
      cortex plugin new my-store --kind source --dir ~/src
      cd ~/src/cortex-source-my-store && pip install -e '.[test]' && python -m pytest
    """
    try:
        names = PluginNames(check_plugin_name(name), kind)
        if names.distribution in SHIPPED_DISTRIBUTIONS:
            raise PluginNameError(
                f"{names.distribution} is a distribution cortex ships; installing a skeleton "
                "of that name would replace it (pick another NAME)"
            )
        target = render_plugin(names, directory)
    except PluginNameError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    except (FileExistsError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created {target} ({names.distribution}, entry point {names.entry_point!r})")
    click.echo("next:")
    click.echo(f"  cd {target}")
    click.echo("  pip install -e '.[test]'")
    click.echo("  python -m pytest")
    click.echo(f"  cortex plugins   # lists {names.entry_point}")
