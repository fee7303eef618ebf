"""The log formatters (text, JSON, credential masking) and the stream probes the proxy uses for
time to first token and usage, on the exact bytes a neuron sends."""

from __future__ import annotations

import json
import logging

import pytest

from cortex.gateway.stream_probe import chunk_has_content, frames_have_content, take_usage
from cortex.logging import JsonFormatter, TextFormatter, redact
from cortex.wire.sse import DONE, encode_data


def record(message: str, *args: object, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("cortex.requests", logging.INFO, __file__, 1, message, args, None)
    if fields:
        rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_json_lines_carry_fields_at_the_top_level() -> None:
    line = JsonFormatter().format(
        record("/v1/chat/completions", model="m", node="n1", status="ok", ttft_s=0.25, code=None)
    )
    entry = json.loads(line)
    assert entry["message"] == "/v1/chat/completions" and entry["logger"] == "cortex.requests"
    assert entry["level"] == "info" and entry["ts"].endswith("Z")
    assert (entry["model"], entry["node"], entry["status"], entry["ttft_s"]) == (
        "m",
        "n1",
        "ok",
        0.25,
    )
    assert "code" not in entry  # None fields are left out
    assert "\n" not in line


def test_json_lines_hold_tracebacks_in_one_object() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        import sys

        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_text_lines_append_fields() -> None:
    line = TextFormatter().format(record("/v1/messages", model="m", node="none", duration_s=1.5))
    assert line.endswith("INFO cortex.requests: /v1/messages model=m node=none duration_s=1.5000")


@pytest.mark.parametrize(
    "secret_text",
    [
        "Authorization: Bearer abcdefghijklmnop",
        "key ck-AAAAAAAAAAAAAAAAAAAAAAAAAAAA used",
        "openai sk-proj-0123456789abcdef",
        "hf token hf_abcdefghijklmnopqrstuvwx",
        "api_key=supersecretvalue",
        '{"x-api-key": "supersecretvalue"}',
        "token: supersecretvalue",
    ],
)
def test_credentials_are_masked_in_both_formats(secret_text: str) -> None:
    secret = secret_text.split()[-2] if secret_text.endswith(" used") else None
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record("request with %s", secret_text))
        assert "[redacted]" in line
        for word in ("abcdefghijklmnop", "AAAAAAAAAAAA", "0123456789abcdef", "supersecretvalue"):
            assert word not in line
        if secret:
            assert secret not in line


def test_masking_leaves_ordinary_lines_alone() -> None:
    text = "loading huggingface:acme/tiny-chat on n1/cpu (tokens: 35 prompt)"
    assert redact(text) == text


ROLE = encode_data(
    {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    }
)
TEXT = encode_data({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
REASONING = encode_data({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]})
TOOL = encode_data({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
COMPLETION = encode_data({"object": "text_completion", "choices": [{"index": 0, "text": "x"}]})
FINISH = encode_data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = encode_data({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}})


def test_only_content_counts_as_the_first_token() -> None:
    assert not frames_have_content(ROLE)
    assert not frames_have_content(FINISH + USAGE + DONE)
    assert not frames_have_content(b": keep-alive\n\n")
    for frame in (TEXT, REASONING, TOOL, COMPLETION):
        assert frames_have_content(frame)
        assert frames_have_content(ROLE + frame)
    assert chunk_has_content({"choices": [{"delta": {"content": "a"}}]})
    assert not chunk_has_content({"choices": "nonsense"})


def test_usage_is_read_and_the_usage_only_chunk_dropped_on_request() -> None:
    frames = FINISH + USAGE + DONE
    usage, kept = take_usage(frames, drop_usage_only=False)
    assert usage == {"prompt_tokens": 3, "completion_tokens": 5} and kept == frames
    usage, kept = take_usage(frames, drop_usage_only=True)
    assert usage["completion_tokens"] == 5 and kept == FINISH + DONE
    assert take_usage(USAGE, drop_usage_only=True) == (usage, b"")
