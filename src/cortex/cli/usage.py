"""``cortex usage``: tokens, requests and time per key and model, from the gateway's usage store.

It asks ``GET /admin/usage`` (an admin key when the gateway has keys, like ``cortex status``);
with a PostgreSQL store that is every gateway's usage. ``--json`` and ``--csv`` export the rows
as they are, for a spreadsheet or a bill.
"""

from __future__ import annotations

import csv
import json
import sys
from typing import Any
from urllib.parse import urlencode

import click

from cortex.cli.admin import GatewayClient, gateway_options
from cortex.cli.console import console, table

COLUMNS = (
    "period",
    "key",
    "model",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "duration_s",
)


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"period": None, "key": "(all)", "model": "(all)"}
    for column in COLUMNS[3:]:
        total[column] = sum(r.get(column) or 0 for r in rows)
    total["duration_s"] = round(total["duration_s"], 3)
    return total


def render(answer: dict[str, Any]) -> None:
    rows = answer.get("usage") or []
    out = console()
    out.print(
        f"usage since {answer.get('since')} until {answer.get('until')}"
        f"{' for key ' + answer['key'] if answer.get('key') else ''} "
        f"(store: {answer.get('store')}, by {answer.get('group')})"
    )
    shown = [*rows, _totals(rows)] if len(rows) > 1 else rows
    by_period = answer.get("group") != "total"
    columns = ["period"] * by_period + [
        "key",
        "model",
        "requests",
        "errors",
        "prompt",
        "completion",
        "total",
        "time",
    ]
    lines = [
        [str(r["period"] or "-")] * by_period
        + [
            str(r["key"]),
            str(r["model"]),
            str(r["requests"]),
            str(r["errors"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            str(r["total_tokens"]),
            f"{float(r['duration_s']):.1f}s",
        ]
        for r in shown
    ]
    out.print(table("usage", columns, lines or [["-"] * len(columns)]))


@click.command("usage")
@gateway_options
@click.option("--key", default=None, help="Only this key (its name).")
@click.option(
    "--since",
    default="30d",
    show_default=True,
    help="From when: 7d / 24h / 30m ago, an ISO date or time (UTC), or unix seconds.",
)
@click.option("--until", default=None, help="Until when (same forms); default: now.")
@click.option(
    "--by",
    "group",
    type=click.Choice(["total", "hour", "day", "month"]),
    default="total",
    show_default=True,
    help="One row per key and model, or per hour, day or month (UTC) too.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's JSON answer.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the rows as CSV (with a header).")
def usage(
    endpoint: str,
    admin_key: str | None,
    key: str | None,
    since: str,
    until: str | None,
    group: str,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Show usage per key and model: requests, errors, prompt and completion tokens, time.

    Example: cortex usage --key alice --since 7d --by day
    """
    params = {"since": since, "group": group}
    if key is not None:
        params["key"] = key
    if until is not None:
        params["until"] = until
    client = GatewayClient(endpoint, admin_key, timeout=30)
    answer = client.call("GET", f"/admin/usage?{urlencode(params)}")
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in answer.get("usage") or []:
            writer.writerow({c: row.get(c) for c in COLUMNS})
    else:
        render(answer)
