"""``cortex keys new|hash``: make API keys and the hashed lines a key file stores.

Keys are read from stdin, never from arguments: an argument lands in shell history and in
``ps`` output for everyone on the machine.
"""

from __future__ import annotations

import sys

import click

from cortex.auth import hash_key, new_key


@click.group("keys")
def keys() -> None:
    """Make API keys and key-file lines (see docs/security.md).

    Example: cortex keys new --label alice
    """


@keys.command("new")
@click.option("--label", default="", help="A label written after the hash in the key-file line.")
def new(label: str) -> None:
    """Print a new random key (give it to the client) and its key-file line (keep it).

    Example: cortex keys new --label alice >> /dev/tty
    """
    key = new_key()
    line = f"{hash_key(key)} {label}".rstrip()
    click.echo(f"key:           {key}")
    click.echo(f"key-file line: {line}")


@keys.command("hash")
@click.option("--label", default="", help="A label written after the hash.")
def hash_command(label: str) -> None:
    """Read keys from stdin (one per line) and print one key-file line for each.

    Example: printf '%s\\n' "$MY_KEY" | cortex keys hash >> /etc/cortex/keys.txt
    """
    count = 0
    for line in sys.stdin:
        key = line.strip()
        if not key:
            continue
        click.echo(f"{hash_key(key)} {label}".rstrip())
        count += 1
    if count == 0:
        raise click.ClickException("no key on stdin (pipe one key per line)")
