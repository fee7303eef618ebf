"""docs/grafana-dashboard.json stays true to what cortex exposes: every metric a panel or a
variable queries exists on a gateway's or a neuron's /metrics with the right type, and every
metric cortex exposes is documented in docs/operators.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from cortex.testing.metrics import Exposition

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
METRIC = re.compile(r"\b((?:cortex|neuron)_[a-z_]+)\b")
SUFFIX_TYPES = {"_bucket": "histogram", "_sum": "histogram", "_count": "histogram"}


def family_of(name: str, exposed: Exposition) -> tuple[str, str | None]:
    """(family, the type this sample name implies) for a name a query uses."""
    for suffix, kind in SUFFIX_TYPES.items():
        if name.endswith(suffix) and name[: -len(suffix)] in exposed.families:
            return name[: -len(suffix)], kind
    if name.endswith("_total") and name[: -len("_total")] in exposed.families:
        return name[: -len("_total")], "counter"
    return name, None


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] == "cortex" and board["uid"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]


def test_every_queried_metric_is_exposed(fleet, metrics_of) -> None:
    gateway = metrics_of(fleet.gateway()).scrape()
    neuron = Exposition(httpx.get(f"{fleet.neuron_url('n1')}/metrics", timeout=10).text)
    used = {m for q in dashboard_queries() for m in METRIC.findall(q)}
    assert any(m.startswith("cortex_") for m in used) and any(m.startswith("neuron_") for m in used)
    for name in sorted(used):
        exposed = gateway if name.startswith("cortex_") else neuron
        family, implied = family_of(name, exposed)
        assert family in exposed.families, f"the dashboard queries {name}, not exposed"
        if implied is not None:
            assert exposed.types[family] == implied, f"{name}: {family} is {exposed.types[family]}"
        else:
            assert exposed.types[family] in ("gauge", "unknown"), f"{name} needs a suffix"


def test_every_exposed_metric_is_documented(fleet, metrics_of) -> None:
    doc = (DOCS / "operators.md").read_text()
    gateway = metrics_of(fleet.gateway()).scrape()
    neuron = Exposition(httpx.get(f"{fleet.neuron_url('n1')}/metrics", timeout=10).text)
    for exposed in (gateway, neuron):
        for family in exposed.families:
            if not family.startswith(("cortex_", "neuron_")) or family.endswith("_created"):
                continue  # _created: the parser's view of a histogram's creation time
            shown = family + ("_total" if exposed.types[family] == "counter" else "")
            assert f"`{shown}`" in doc, f"{shown} is not in docs/operators.md"
