"""``cortex keys new|hash``: make API keys and the hashed lines a key file stores.

Keys are read from stdin, never from arguments: an argument lands in shell history and in
``ps`` output for everyone on the machine. A key file line carries the key's name and limits
(:mod:`cortex.keyfile`); ``--key-file`` appends it, so the key itself is printed once and never
written anywhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cortex.auth import hash_key, new_key
from cortex.config import ConfigError
from cortex.keyfile import KeyLimits, check_name, format_line, read_key_file


def _limits(
    models: tuple[str, ...],
    rpm: int | None,
    tpm: int | None,
    budget_tokens: int | None,
    per: str | None,
) -> KeyLimits:
    listed = tuple(m for spec in models for m in spec.split(",") if m)
    if budget_tokens is not None and per is None:
        raise click.BadParameter("--budget-tokens needs --per day|month", param_hint="--per")
    if per is not None and budget_tokens is None:
        raise click.BadParameter("--per goes with --budget-tokens", param_hint="--budget-tokens")
    try:
        return KeyLimits(models=listed, rpm=rpm, tpm=tpm, budget_tokens=budget_tokens, per=per)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _append(path: Path, line: str, name: str | None) -> None:
    """Append ``line`` to the key file at ``path`` (created 0600 when missing), refusing a name
    that is already there with other limits (lines sharing a name are one account)."""
    if path.exists():
        try:
            existing = read_key_file(path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if name is not None and any(e.key.name == name for e in existing):
            raise click.ClickException(
                f"{path} already has a key named {name!r} (revoke its line first, or pick "
                "another name; to rotate a key, add the new line by hand with the same "
                "attributes)"
            )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        if f.tell() and not path.read_text().endswith("\n"):
            f.write("\n")
        f.write(line + "\n")


@click.group("keys")
def keys() -> None:
    """Make API keys and key-file lines (see docs/security.md).

    Example: cortex keys new --name alice --rpm 60 --key-file /etc/cortex/keys.txt
    """


@keys.command("new")
@click.option(
    "--name",
    "--label",
    "name",
    default=None,
    help="The key's name: shown in logs, metrics, cortex status and cortex usage.",
)
@click.option(
    "--models",
    multiple=True,
    metavar="IDS",
    help="Only these models or aliases (comma-separated, or the option repeated).",
)
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="Tokens per minute.")
@click.option(
    "--budget-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens (prompt + completion) per --per period.",
)
@click.option(
    "--per", type=click.Choice(["day", "month"]), default=None, help="Budget period (UTC)."
)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append the line to this key file (created with mode 0600).",
)
def new(
    name: str | None,
    models: tuple[str, ...],
    rpm: int | None,
    tpm: int | None,
    budget_tokens: int | None,
    per: str | None,
    key_file: Path | None,
) -> None:
    """Print a new random key (give it to the client) and its key-file line (keep it).

    Example: cortex keys new --name alice --models qwen --budget-tokens 100000 --per day
    """
    if name is not None:
        try:
            check_name(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--name") from None
    limits = _limits(models, rpm, tpm, budget_tokens, per)
    key = new_key()
    line = format_line(hash_key(key), name, limits)
    if key_file is not None:
        _append(key_file, line, name)
    click.echo(f"key:           {key}")
    click.echo(f"key-file line: {line}" + (f"  (appended to {key_file})" if key_file else ""))


@keys.command("hash")
@click.option("--name", "--label", "name", default=None, help="The name written after the hash.")
def hash_command(name: str | None) -> None:
    """Read keys from stdin (one per line) and print one key-file line for each.

    Example: printf '%s\\n' "$MY_KEY" | cortex keys hash --name ci >> /etc/cortex/keys.txt
    """
    if name is not None:
        try:
            check_name(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--name") from None
    count = 0
    for line in sys.stdin:
        key = line.strip()
        if not key:
            continue
        click.echo(format_line(hash_key(key), name, KeyLimits()))
        count += 1
    if count == 0:
        raise click.ClickException("no key on stdin (pipe one key per line)")
