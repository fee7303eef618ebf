"""``neuron pull MODEL_ID``: prefetch a model into its source's cache, so a node is warm before
traffic arrives (and an air-gapped node can be filled while it still has a network).

It does what a load does up to the device: resolve the id, preflight (one registry round trip),
pick the harness (``--harness``, else the one a load would pick: :mod:`cortex.harness_choice`),
and fetch exactly the files that harness needs. It prints where the files are.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from cortex import harness_choice
from cortex.cli.common import configure_logging
from cortex.config import ConfigError, load_neuron_config
from cortex.harness import Harness
from cortex.source import InvalidRepoIdError, ModelIdError, Preflight, SourceError
from cortex.source_resolver import SourceResolver
from cortex.wire.errors import ApiError

log = logging.getLogger(__name__)


class PullError(Exception):
    """A pull that cannot go on; ``payload`` is what ``--json`` prints."""

    def __init__(self, message: str, payload: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.payload = payload or {"kind": "pull_failed", "message": message}


def choose_harness(harnesses: list[Harness], preflight: Preflight, wanted: str | None) -> Harness:
    """The harness the neuron would load the repo with (:mod:`cortex.harness_choice`)."""
    try:
        return harness_choice.choose_harness(harnesses, preflight, wanted)
    except ApiError as exc:
        raise PullError(
            exc.message, {**(exc.details or {}), "kind": exc.code, "message": exc.message}
        ) from None


def pull_model(
    raw_id: str, quant: str | None, harness_name: str | None, config_path: Path | None
) -> dict[str, Any]:
    """Preflight, choose a harness, fetch its files; returns what ``neuron pull`` reports."""
    from cortex.plugins import get_registry

    registry = get_registry()
    config = load_neuron_config(config_path)
    resolver = SourceResolver.from_config(config, registry.source_plugins())
    model_id, source = resolver.resolve(raw_id)
    preflight = source.preflight(model_id, quant)
    harness = choose_harness(registry.harnesses(), preflight, harness_name)
    files = harness.files_needed(preflight)
    if not files:
        raise PullError(f"harness {harness.name!r} needs no files of {preflight.model_id}")
    started = time.monotonic()
    snapshot = source.fetch(model_id, files, revision=preflight.revision)
    fetch_seconds = time.monotonic() - started
    local = [
        p
        for p in sorted(snapshot.rglob("*"))
        if p.is_file() and _fetched(p.relative_to(snapshot).as_posix(), files)
    ]
    return {
        "model_id": preflight.model_id,
        "source": source.settings.scheme,
        "endpoint": source.settings.endpoint,
        "harness": harness.name,
        "revision": preflight.revision,
        "weight_format": preflight.weight_format,
        "gguf_file": preflight.gguf_file,
        "download_bytes": preflight.download_bytes,
        "snapshot": str(snapshot),
        # the fetch alone (no preflight, no start-up): benchmarks/cold_start.py reads it
        "fetch_seconds": round(fetch_seconds, 4),
        "files": [
            {
                "path": p.relative_to(snapshot).as_posix(),
                "local_path": str(p),
                "size": p.stat().st_size,
            }
            for p in local
        ],
    }


_SHARD = re.compile(r"-\d{5}-of-(\d{5})\.gguf$", re.IGNORECASE)


def _fetched(path: str, files: list[str]) -> bool:
    """Whether ``path`` is one of ``files`` or a shard of a split GGUF file among them."""
    if path in files:
        return True
    match = _SHARD.search(path)
    return match is not None and any(
        (other := _SHARD.search(f)) is not None and f[: other.start()] == path[: match.start()]
        for f in files
    )


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@click.command("pull")
@click.argument("model_id")
@click.option("--quant", default=None, help="GGUF quant to fetch (case-insensitive, e.g. q4_k_m).")
@click.option(
    "--harness",
    "harness_name",
    default=None,
    help="Harness to fetch for (default: the one a load would pick, docs/plugins.md).",
)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="neuron.toml (sources, caches); default: built-in defaults.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result (or error) as JSON.")
@click.option("--log-level", default="info", show_default=True)
def pull(
    model_id: str,
    quant: str | None,
    harness_name: str | None,
    config_path: Path | None,
    as_json: bool,
    log_level: str,
) -> None:
    """Prefetch MODEL_ID into its source's cache and print where the files are.

    \b
    Examples:
      neuron pull helexa:acme/tiny-chat
      neuron pull huggingface:acme/tiny-gguf --quant q4_k_m -c neuron.toml
      neuron pull acme/tiny --harness torch --json
    """
    configure_logging(log_level)
    # one line per HTTP request drowns the progress lines an operator is watching
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        result = pull_model(model_id, quant, harness_name, config_path)
    except SourceError as exc:  # an id the registry client refuses is a bad id, like a parse error
        _fail(exc.message, exc.to_json(), as_json, 2 if isinstance(exc, InvalidRepoIdError) else 1)
    except ModelIdError as exc:
        _fail(str(exc), {"kind": exc.code, "message": str(exc)}, as_json, 2)
    except ConfigError as exc:
        _fail(str(exc), {"kind": "config_error", "message": str(exc)}, as_json, 2)
    except PullError as exc:
        _fail(exc.message, exc.payload, as_json, 1)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"pulled {result['model_id']} for harness {result['harness']} "
        f"(commit {result['revision'][:12]}, {_human(result['download_bytes'])}, "
        f"fetched in {result['fetch_seconds']:.2f} s)"
    )
    click.echo(f"snapshot: {result['snapshot']}")
    for entry in result["files"]:
        click.echo(f"  {entry['path']}  {_human(entry['size'])}")


def _fail(message: str, payload: dict[str, Any], as_json: bool, code: int) -> None:
    if as_json:
        click.echo(json.dumps({"error": payload}, indent=2))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)
