"""Nothing a client sends is silently ignored (issue 19): every request field of the three
dialects, as the official specs and SDK types list them, is handled, refused with a 400 naming
it when set to something cortex cannot honour, or ignored on purpose -- and then listed with its
reason in docs/clients.md. A field a new spec adds fails the first test until it is classified.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import message_create_params
from anthropic.types.beta import message_create_params as beta_message_create_params

from cortex.neuron import requests as chat_fields
from cortex.neuron.requests import parse_chat_request, parse_completion_request
from cortex.testing.specs import ANTHROPIC, OPENAI, request_fields
from cortex.wire import anthropic, responses
from cortex.wire.errors import ApiError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
ASK = [{"role": "user", "content": "x"}]


def anthropic_fields() -> set[str]:
    """The spec's fields, the SDK's and its beta namespace's (Claude Code sends beta fields)."""
    return (
        request_fields(ANTHROPIC, "CreateMessageParams")
        | set(message_create_params.MessageCreateParamsBase.__annotations__)
        | set(beta_message_create_params.MessageCreateParamsBase.__annotations__)
    )


DIALECTS: dict[str, tuple[Any, frozenset[str], dict[str, str]]] = {
    # name: (spec fields, handled, ignored on purpose)
    "chat": (
        lambda: request_fields(OPENAI, "CreateChatCompletionRequest"),
        chat_fields.HANDLED_FIELDS,
        chat_fields.IGNORED_FIELDS,
    ),
    "completions": (
        lambda: request_fields(OPENAI, "CreateCompletionRequest"),
        chat_fields.HANDLED_FIELDS,
        chat_fields.IGNORED_FIELDS,
    ),
    "responses": (
        lambda: request_fields(OPENAI, "CreateResponse"),
        responses.HANDLED_FIELDS,
        responses.IGNORED_FIELDS,
    ),
    "messages": (anthropic_fields, anthropic.HANDLED_FIELDS, anthropic.IGNORED_FIELDS),
}


def parse(dialect: str, **fields: Any) -> Any:
    if dialect == "chat":
        return parse_chat_request({"model": "m", "messages": ASK, **fields})
    if dialect == "completions":
        return parse_completion_request({"model": "m", "prompt": "x", **fields})
    if dialect == "responses":
        return responses.parse_responses_request({"model": "m", "input": "x", **fields})
    return anthropic.parse_messages_request(
        {"model": "m", "max_tokens": 5, "messages": ASK, **fields}
    )


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_spec_field_is_classified(dialect: str) -> None:
    fields, handled, ignored = DIALECTS[dialect]
    spec = fields()
    assert not handled & set(ignored), "a field is both handled and ignored"
    unclassified = sorted(spec - handled - set(ignored))
    assert not unclassified, f"{dialect}: fields neither handled nor ignored on purpose"


# A value cortex cannot honour for every field it refuses when set (the 400 names the field).
REFUSED: dict[str, dict[str, Any]] = {
    "chat": {
        "n": 17,  # at most 16
        "logprobs": "yes",  # a boolean
        "top_logprobs": 21,  # at most 20 (and it needs logprobs: true)
        "logit_bias": {"1": 5},
        "response_format": {"type": "xml"},
        "store": True,
        "functions": [{"name": "f"}],
        "function_call": "auto",
        "web_search_options": {},
        "audio": {"voice": "alloy", "format": "mp3"},
        "modalities": ["text", "audio"],
    },
    "completions": {
        "n": 0,  # at least 1
        "best_of": 2,
        "echo": True,
        "suffix": "end",
        "logprobs": 6,  # at most 5
        "logit_bias": {"1": 5},
    },
    "responses": {
        "previous_response_id": "resp_1",
        "conversation": "conv_1",
        "prompt": {"id": "pmpt_1"},
        "store": True,
        "background": True,
        "top_logprobs": 21,  # at most 20
        "include": "message.output_text.logprobs",  # a list
        "text": {"format": {"type": "xml"}},
    },
    "messages": {
        "output_config": {"format": {"type": "regex", "pattern": "a+"}},
        "output_format": {"type": "json_schema"},  # no schema
        "container": "container_1",
        "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "m"}],
        "compaction": {"type": "auto"},
        "fallbacks": [{"model": "other"}],
        "thread": {"id": "t"},
    },
}


@pytest.mark.parametrize(
    ("dialect", "field"), [(d, f) for d, cases in REFUSED.items() for f in sorted(cases)]
)
def test_unsupported_values_are_refused_naming_the_field(dialect: str, field: str) -> None:
    _fields, handled, _ignored = DIALECTS[dialect]
    assert field in handled
    with pytest.raises(ApiError) as caught:
        parse(dialect, **{field: REFUSED[dialect][field]})
    assert caught.value.status == 400
    assert (caught.value.param or "").startswith(field), caught.value.param


# A plausible value for each field ignored on purpose: accepted, changes nothing.
IGNORED_SAMPLES: dict[str, Any] = {
    "user": "user-1",
    "safety_identifier": "sid",
    "metadata": {"k": "v"},
    "prompt_cache_key": "key",
    "prompt_cache_retention": "24h",
    "service_tier": "auto",
    "reasoning_effort": "low",
    "verbosity": "low",
    "prediction": {"type": "content", "content": "x"},
    "parallel_tool_calls": False,
    "tool_choice": "auto",
    "reasoning": {"effort": "low", "summary": "auto"},
    "stream_options": {"include_obfuscation": False},
    "max_tool_calls": 3,
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "client_metadata": {"session_id": "s"},
    "cache_control": {"type": "ephemeral"},
    "inference_geo": "us",
    "speed": "fast",
    "betas": ["context-management-2025-06-27"],
    "diagnostics": {},
    "user_profile_id": "u",
    "workspace_id": "w",
    "billing_policy": "standard",
    "fallback_credit_token": "t",
}
RESPONSES_SAMPLES = {"context_management": [{"type": "compaction", "compact_threshold": 1000}]}


def ignored_cases() -> list[tuple[str, str]]:
    """(dialect, field) for each field ignored on purpose that the dialect's spec has (chat
    and completions share one table; the spec is read once, at collection)."""
    cases = []
    for dialect, (fields, _handled, ignored) in DIALECTS.items():
        spec = fields()
        cases += [(dialect, field) for field in sorted(ignored) if field in spec]
    return cases


@pytest.mark.parametrize(("dialect", "field"), ignored_cases())
def test_ignored_fields_are_accepted(dialect: str, field: str) -> None:
    sample = IGNORED_SAMPLES[field]
    if dialect == "responses":
        sample = RESPONSES_SAMPLES.get(field, sample)
    if dialect == "messages" and field == "metadata":
        sample = {"user_id": "u"}
    parse(dialect, **{field: sample})


def documented_ignored() -> set[str]:
    """The field names in docs/clients.md's "ignored on purpose" section."""
    text = DOCS.read_text()
    section = text.split("## What cortex does with what it cannot serve", 1)[1]
    section = section.split("\n## ", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", section))


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_ignored_fields_are_documented(dialect: str) -> None:
    missing = sorted(set(DIALECTS[dialect][2]) - documented_ignored())
    assert not missing, f"docs/clients.md does not list these ignored {dialect} fields"
