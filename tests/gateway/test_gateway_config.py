"""The gateway keys of cortex.example.toml: documented values are the real defaults."""

from __future__ import annotations

from pathlib import Path

import attrs

from cortex.config import GatewaySection, load_cortex_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_gateway_section_shows_the_defaults() -> None:
    example = load_cortex_config(ROOT / "cortex.example.toml").gateway
    assert attrs.asdict(example) == attrs.asdict(GatewaySection())
    text = (ROOT / "cortex.example.toml").read_text()
    for key in (
        "poll_interval",
        "down_after_failures",
        "connect_timeout",
        "idle_timeout",
        "load_timeout",
        "retry_after",
        "default_source",
    ):
        assert key in text, f"cortex.example.toml does not document [gateway] {key}"


def test_gateway_doc_is_linked_and_names_every_error_code() -> None:
    assert "gateway.md" in (ROOT / "docs" / "index.md").read_text()
    doc = (ROOT / "docs" / "gateway.md").read_text()
    for code in (
        "missing_model_field",
        "model_not_found",
        "model_too_large",
        "service_unavailable",
        "insufficient_memory",
        "load_timeout",
        "upstream_connection_error",
        "upstream_timeout",
        "x-cortex-node",
        "x-cortex-model",
    ):
        assert code in doc, code
