"""Builders for the OpenAI shapes the neuron emits and the translators consume.

One place builds ``chat.completion``, ``chat.completion.chunk`` and ``text_completion`` dicts
(the neuron's answers: ``cortex.neuron.framing``), so the neuron, the gateway and the
Anthropic/Responses translators agree on every field (tests parse the results
with the ``openai`` SDK's own models). Plain dicts, not classes: they go straight to JSON on the
hot path.

cortex extension: a choice whose ``finish_reason`` is ``"stop"`` because a stop string matched
carries ``"stop_sequence": "<the string>"`` (null otherwise), so the Anthropic translator can
report ``stop_reason: "stop_sequence"`` with the sequence, as Anthropic's API does.
"""

from __future__ import annotations

import copy
import json
import secrets
import string
import time
from typing import Any

from cortex.wire.errors import ApiError

_ALPHABET = string.ascii_letters + string.digits

FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


def random_id(prefix: str, size: int = 24) -> str:
    """``prefix`` + random alphanumerics: the id style of both APIs (``chatcmpl-``, ``msg_``)."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(size))


def completion_id() -> str:
    return random_id("chatcmpl-")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def assistant_message(
    content: str | None,
    *,
    reasoning_content: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``message`` of a non-streaming choice; empty content with tool calls becomes null."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content if (content or not tool_calls) else None,
        "refusal": None,  # required by the OpenAI spec
    }
    if reasoning_content:
        message["reasoning_content"] = reasoning_content
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_choice(
    *,
    index: int = 0,
    message: dict[str, Any],
    finish_reason: str,
    stop_sequence: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice of a whole ``chat.completion``."""
    return {
        "index": index,
        "message": message,
        "finish_reason": finish_reason,
        "logprobs": logprobs,
        "stop_sequence": stop_sequence,
    }


def chat_completion(
    *,
    id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    message: dict[str, Any] | None = None,
    finish_reason: str = "stop",
    created: int | None = None,
    stop_sequence: str | None = None,
    logprobs: dict[str, Any] | None = None,
    choices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole ``chat.completion`` with usage: ``choices`` (:func:`chat_choice`), or one
    choice from ``message`` / ``finish_reason`` / ``stop_sequence`` / ``logprobs``."""
    if choices is None:
        assert message is not None
        choices = [
            chat_choice(
                message=message,
                finish_reason=finish_reason,
                stop_sequence=stop_sequence,
                logprobs=logprobs,
            )
        ]
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    *,
    id: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    created: int | None = None,
    stop_sequence: str | None = None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with one choice (role, content, reasoning or tool deltas)."""
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "finish_reason": finish_reason,
        "logprobs": logprobs,
    }
    if finish_reason is not None:
        choice["stop_sequence"] = stop_sequence
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    *,
    id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    created: int | None = None,
    object: str = "chat.completion.chunk",
) -> dict[str, Any]:
    """The final chunk of a stream with ``stream_options.include_usage``: no choices, usage
    (``object`` is ``text_completion`` on ``/v1/completions``)."""
    return {
        "id": id,
        "object": object,
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_choice(
    *, index: int = 0, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One choice of a ``text_completion`` (whole, or a streamed chunk's)."""
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion(
    *,
    id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    text: str = "",
    finish_reason: str = "stop",
    created: int | None = None,
    logprobs: dict[str, Any] | None = None,
    choices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole ``text_completion`` (``/v1/completions``) with usage: ``choices``
    (:func:`completion_choice`), or one choice from ``text`` / ``finish_reason`` /
    ``logprobs``."""
    if choices is None:
        choices = [completion_choice(text=text, finish_reason=finish_reason, logprobs=logprobs)]
    return {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    *,
    id: str,
    model: str,
    text: str,
    finish_reason: str | None = None,
    created: int | None = None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    return {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            completion_choice(
                index=index, text=text, finish_reason=finish_reason, logprobs=logprobs
            )
        ],
    }


def token_logprob(token: str, logprob: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    """One entry of a chat choice's ``logprobs.content`` (and of a Responses output_text's
    ``logprobs``): the token, its log-probability, its UTF-8 bytes, and the alternatives."""
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [
            {"token": t, "logprob": value, "bytes": list(t.encode("utf-8"))} for t, value in top
        ],
    }


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat choice's ``logprobs`` object over ``entries`` (:func:`token_logprob`)."""
    return {"content": entries, "refusal": None}


def completion_logprobs(
    tokens: list[tuple[str, float, list[tuple[str, float]]]], offset: int = 0
) -> dict[str, Any]:
    """The legacy ``/v1/completions`` logprobs object: parallel lists of the tokens, their
    log-probabilities, a {token: logprob} map of the alternatives each, and each token's
    character offset in the completion text (from ``offset``, where the last part ended)."""
    offsets = []
    for token, _, _ in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": [token for token, _, _ in tokens],
        "token_logprobs": [value for _, value, _ in tokens],
        "top_logprobs": [dict(top) for _, _, top in tokens],
        "text_offset": offsets,
    }


# Upstream JSON is read defensively: a malformed field reads as absent, never as a crash.


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def text(value: Any, default: str = "") -> str:
    """``value`` if it is a non-empty string, else ``default``."""
    return value if isinstance(value, str) and value else default


def count(value: Any) -> int:
    """``value`` if it is a non-negative integer (a token count), else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# HTTP status for an OpenAI error ``type`` (a stream error frame carries no status of its own).
_STATUS_FOR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "server_error": 500,
    "upstream_error": 502,
    "service_unavailable_error": 503,
    "timeout_error": 504,
}


def stream_error(chunk: dict[str, Any]) -> ApiError | None:
    """The error in a mid-stream ``data: {"error": {...}}`` frame, or None for a normal chunk.

    Neurons and the proxy report a failure after the headers went out this way; the status is
    recovered from the error ``type`` so the Anthropic translator can pick its error type.
    """
    error = chunk.get("error")
    if not isinstance(error, dict) or "choices" in chunk:
        return None
    if not isinstance(error.get("message"), str):
        error = {**error, "message": "the upstream failed mid-stream"}
    status = _STATUS_FOR_TYPE.get(str(error.get("type")), 502)
    return ApiError.from_openai_body(status, {"error": error})


def tool_call_arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of OpenAI chat messages with assistant tool-call arguments decoded to dicts.

    OpenAI carries arguments as JSON strings, but many chat templates (Qwen, Llama 3, Hermes)
    iterate ``tool_call.function.arguments`` as a mapping (``arguments | items``) or dump it with
    ``tojson``; a string there renders wrongly or fails. Call this before ``apply_chat_template``.
    Arguments that are not a JSON object are left as they are.
    """
    rendered = copy.deepcopy(messages)
    for message in rendered:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
                continue
            try:
                decoded = json.loads(function["arguments"] or "{}")
            except ValueError:
                continue
            if isinstance(decoded, dict):
                function["arguments"] = decoded
    return rendered


def message_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, or the text of its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


__all__ = [
    "FINISH_REASONS",
    "assistant_message",
    "chat_choice",
    "chat_chunk",
    "chat_completion",
    "chat_logprobs",
    "completion_choice",
    "completion_chunk",
    "completion_id",
    "completion_logprobs",
    "count",
    "items",
    "message_text",
    "obj",
    "random_id",
    "stream_error",
    "text",
    "text_completion",
    "token_logprob",
    "tool_call_arguments_as_objects",
    "usage",
    "usage_chunk",
]
