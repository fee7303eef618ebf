"""Anthropic Messages API <-> OpenAI chat completions (pure translation, no I/O).

The gateway speaks Anthropic on ``/v1/messages`` but the neurons speak OpenAI. This module:

- validates an Anthropic request body and builds the OpenAI ``chat.completions`` body for the
  neuron (:func:`parse_messages_request`), refusing what cannot be honoured with a typed 400;
- turns the neuron's ``chat.completion`` into an Anthropic ``message``
  (:func:`message_from_chat_completion`);
- turns the neuron's chunk stream into Anthropic's SSE event sequence
  (:class:`AnthropicStreamTranslator`, a state machine fed chunks, ticks and errors).

Mapping rules are listed in docs/clients.md. Every request field of the API is handled
(:data:`HANDLED_FIELDS`), accepted and ignored on purpose with a documented reason
(:data:`IGNORED_FIELDS`), or refused with a 400 when set to something cortex cannot honour;
tests/wire/test_request_fields.py walks the official spec and the SDK's types against this.
Server tools (``web_search_...``, ``code_execution_...``) follow the gateway's ``hosted_tools``
policy, as on ``/v1/responses``: dropped and named, or refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import attrs

from cortex.wire.errors import ApiError, bad_request
from cortex.wire.openai_types import count, items, obj, random_id, stream_error, text
from cortex.wire.sse import encode_event

log = logging.getLogger(__name__)

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# Block types that only Anthropic's own servers can run or produce.
_UNSUPPORTED_BLOCKS = {
    "image": "image input is not supported by cortex models",
    "document": "document input is not supported by cortex models",
    "search_result": "search_result blocks are not supported",
    "server_tool_use": "server tools are not supported by cortex",
    "web_search_tool_result": "server tools are not supported by cortex",
    "container_upload": "container uploads are not supported by cortex",
}
# Blocks accepted in history and not forwarded (the model cannot use them).
_DROPPED_BLOCKS = {"thinking", "redacted_thinking"}

# What a server tool becomes (``[gateway] hosted_tools``), as in cortex.wire.responses.
DROP = "drop"
REFUSE = "refuse"

HANDLED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
        "container",
        "mcp_servers",
        "compaction",
        "fallbacks",
        "thread",
    }
)
# Accepted and not acted on, on purpose; the reason is what docs/clients.md says.
IGNORED_FIELDS = {
    "metadata": "user_id for the provider's abuse monitoring; cortex keeps none",
    "cache_control": "a prompt-caching hint; cortex has no cross-request cache",
    "service_tier": "the provider's capacity tier; every cortex request is served alike",
    "inference_geo": "where the provider runs inference; the fleet is where it is",
    "speed": "the provider's fast mode",
    "context_management": "server-side clearing of old thinking / tool results; thinking blocks "
    "in history are dropped anyway, and the prompt is sent whole",
    "betas": "beta feature names (a header in the API); features are handled field by field",
    "diagnostics": "the provider's request diagnostics",
    "user_profile_id": "a provider account setting",
    "workspace_id": "a provider account setting",
    "billing_policy": "a provider account setting",
    "fallback_credit_token": "a provider account setting",
}
# ``output_config`` keys: ``effort`` is a hint open models cannot take; ``format`` (structured
# output) becomes the chat request's ``response_format``, enforced while decoding.
_OUTPUT_CONFIG_IGNORED = {"effort"}


@attrs.frozen
class MessagesRequest:
    """A validated Anthropic request: what the client asked for, and the neuron's OpenAI body."""

    model: str
    stream: bool
    chat: dict[str, Any]  # the OpenAI chat.completions request body for the neuron
    thinking: bool = False  # the client enabled extended thinking: return reasoning as thinking
    dropped_tools: tuple[str, ...] = ()  # server tools dropped under the "drop" policy


def anthropic_error_type(error: ApiError) -> str:
    """The Anthropic error ``type`` (``invalid_request_error``, ``overloaded_error``, ...)."""
    return error.anthropic_type


# --- request ---------------------------------------------------------------------------------


def parse_messages_request(body: Any, *, hosted_tools: str = DROP) -> MessagesRequest:
    """Validate an Anthropic Messages request and build the OpenAI chat request from it.
    ``hosted_tools``: what a server tool becomes (:data:`DROP` or :data:`REFUSE`)."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("model: a non-empty string is required", param="model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise bad_request("max_tokens: field required", param="max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise bad_request("max_tokens: must be an integer >= 1", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream: must be a boolean", param="stream")

    system_parts = _system_texts(body.get("system"), "system")
    messages = _messages(body.get("messages"), system_parts)
    if system_parts:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system_parts)})

    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not low <= value <= high:
            raise bad_request(f"{name}: must be a number between {low} and {high}", param=name)
        chat[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise bad_request("top_k: must be an integer >= 0", param="top_k")
        chat["top_k"] = top_k
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_request(
                "stop_sequences: must be a list of non-empty strings", param="stop_sequences"
            )
        if stops:
            chat["stop"] = stops
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("metadata: must be an object", param="metadata")
    response_format = _output_format(body)
    if response_format is not None:
        chat["response_format"] = response_format
    for name, what in (
        ("container", "code execution containers run on Anthropic's servers"),
        ("mcp_servers", "remote MCP servers are called by Anthropic's servers"),
        ("compaction", "server-side compaction of the conversation"),
        ("fallbacks", "fallback models chosen by Anthropic's servers"),
        ("thread", "server-side threads"),
    ):
        if body.get(name) not in (None, [], {}):
            raise bad_request(
                f"{name}: {what}; cortex does not support them",
                param=name,
                code="unsupported_parameter",
            )

    dropped: list[str] = []
    tools = _tools(body.get("tools"), hosted_tools, dropped)
    if tools:
        chat["tools"] = tools
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        _apply_tool_choice(tool_choice, tools, chat)
    return MessagesRequest(
        model=model,
        stream=stream,
        chat=chat,
        thinking=_thinking_enabled(body.get("thinking")),
        dropped_tools=tuple(dropped),
    )


def _output_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """Structured output (``output_config.format``, or the older ``output_format``: ``{"type":
    "json_schema", "schema": {...}}``) as the chat request's ``response_format``, which the
    harness enforces while decoding; what cortex cannot do is refused, never ignored."""
    config = body.get("output_config")
    fmt: Any = None
    param = "output_format"
    if config is not None:
        if not isinstance(config, dict):
            raise bad_request("output_config: must be an object", param="output_config")
        for key, value in config.items():
            if key in _OUTPUT_CONFIG_IGNORED or value is None or key == "format":
                continue
            raise bad_request(
                f"output_config.{key}: not supported by cortex",
                param=f"output_config.{key}",
                code="unsupported_parameter",
            )
        if config.get("format") is not None:
            fmt, param = config["format"], "output_config.format"
    if fmt is None and body.get("output_format") is not None:
        fmt = body["output_format"]
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise bad_request(
            f"{param}: type {kind!r} is not supported (only json_schema)",
            param=param,
            code="unsupported_parameter",
        )
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise bad_request(f"{param}.schema: must be a JSON Schema object", param=f"{param}.schema")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


@attrs.frozen
class CountTokensRequest:
    """A validated ``/v1/messages/count_tokens`` request and the neuron ``/tokenize`` body."""

    model: str
    tokenize: dict[str, Any]  # {"model", "messages", "tools"?} for the neuron's POST /tokenize


def parse_count_tokens_request(body: Any) -> CountTokensRequest:
    """Validate a count_tokens request (a Messages request without ``max_tokens``).

    The count comes from the neuron rendering the same chat messages and tools it would
    generate from, so it is the real prompt length, template included.
    """
    if isinstance(body, dict) and "max_tokens" not in body:
        body = {**body, "max_tokens": 1}
    parsed = parse_messages_request(body)
    tokenize: dict[str, Any] = {"model": parsed.model, "messages": parsed.chat["messages"]}
    if "tools" in parsed.chat:
        tokenize["tools"] = parsed.chat["tools"]
    return CountTokensRequest(model=parsed.model, tokenize=tokenize)


def count_tokens_response(tokenize_answer: dict[str, Any]) -> dict[str, int]:
    """Anthropic's answer from the neuron's ``/tokenize`` answer (``{"count": N, ...}``)."""
    return {"input_tokens": int(tokenize_answer["count"])}


def _thinking_enabled(thinking: Any) -> bool:
    if thinking is None:
        return False
    if not isinstance(thinking, dict) or thinking.get("type") not in (
        "enabled",
        "disabled",
        "adaptive",
    ):
        raise bad_request(
            "thinking: must be {'type': 'enabled'|'disabled'|'adaptive', ...}", param="thinking"
        )
    return thinking["type"] != "disabled"


def _system_texts(system: Any, param: str) -> list[str]:
    """``system`` as a string or a list of text blocks (``cache_control`` and such ignored)."""
    if system is None:
        return []
    if isinstance(system, str):
        return [system] if system else []
    if not isinstance(system, list):
        raise bad_request(f"{param}: must be a string or a list of text blocks", param=param)
    texts = []
    for index, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad_request(f"{param}.{index}: only text blocks are allowed", param=param)
        text = block.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{param}.{index}.text: must be a string", param=param)
        texts.append(text)
    return [text for text in texts if text]


def _messages(raw: Any, system_parts: list[str]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages: a non-empty list is required", param="messages")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        param = f"messages.{index}"
        if not isinstance(message, dict):
            raise bad_request(f"{param}: must be an object", param=param)
        role = message.get("role")
        content = message.get("content")
        if role == "system":  # some clients send these; merged into the leading system message
            system_parts.extend(_system_texts(content, f"{param}.content"))
            continue
        if role not in ("user", "assistant"):
            raise bad_request(
                f"{param}.role: must be 'user' or 'assistant' (got {role!r})", param=param
            )
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(
                f"{param}.content: must be a string or a list of blocks", param=f"{param}.content"
            )
        if role == "assistant":
            out.extend(_assistant_turn(content, param))
        else:
            out.extend(_user_turn(content, param))
    if not out:
        raise bad_request("messages: no user or assistant message", param="messages")
    return out


def _block_type(block: Any, param: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise bad_request(f"{param}: each content block needs a 'type'", param=param)
    kind = block["type"]
    if kind in _UNSUPPORTED_BLOCKS:
        raise bad_request(f"{param}: {_UNSUPPORTED_BLOCKS[kind]}", param=param)
    return kind


def _block_text(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise bad_request(f"{param}.text: must be a string", param=param)
    return text


def _assistant_turn(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        where = f"{param}.content.{index}"
        kind = _block_type(block, where)
        if kind == "text":
            texts.append(_block_text(block, where))
        elif kind == "tool_use":
            call_id, name, tool_input = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"{where}.id: must be a non-empty string", param=where)
            if not isinstance(name, str) or not name:
                raise bad_request(f"{where}.name: must be a non-empty string", param=where)
            if not isinstance(tool_input, dict):
                raise bad_request(f"{where}.input: must be an object", param=where)
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(tool_input)},
                }
            )
        elif kind in _DROPPED_BLOCKS:
            continue
        else:
            raise bad_request(f"{where}: block type {kind!r} is not allowed here", param=where)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return [message]


def _user_turn(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    """Tool results become ``tool`` messages, placed first (right after the assistant's calls)."""
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    for index, block in enumerate(blocks):
        where = f"{param}.content.{index}"
        kind = _block_type(block, where)
        if kind == "text":
            texts.append(_block_text(block, where))
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"{where}.tool_use_id: must be a non-empty string", param=where)
            text = _tool_result_text(block.get("content"), where)
            if block.get("is_error") is True:
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind in _DROPPED_BLOCKS:
            continue
        else:
            raise bad_request(f"{where}: block type {kind!r} is not allowed here", param=where)
    out = results
    if texts or not results:
        out = [*results, {"role": "user", "content": "".join(texts)}]
    return out


def _tool_result_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param}.content: must be a string or a list of blocks", param=param)
    texts = []
    for index, block in enumerate(content):
        where = f"{param}.content.{index}"
        kind = _block_type(block, where)
        if kind != "text":
            raise bad_request(f"{where}: tool results may only contain text", param=where)
        texts.append(_block_text(block, where))
    return "\n".join(texts)


def _tools(raw: Any, hosted_tools: str = DROP, dropped: list[str] | None = None) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request("tools: must be a list", param="tools")
    tools = []
    names = set()
    for index, tool in enumerate(raw):
        param = f"tools.{index}"
        if not isinstance(tool, dict):
            raise bad_request(f"{param}: must be an object", param=param)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            if hosted_tools == DROP and isinstance(kind, str) and dropped is not None:
                dropped.append(kind)  # named in x-cortex-dropped-tools and the log
                continue
            raise bad_request(
                f"{param}: tool type {kind!r} is a server tool Anthropic runs itself; cortex "
                "supports client tools only (name, description, input_schema)",
                param=param,
                code="unsupported_tool",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{param}.name: must be a non-empty string", param=param)
        if name in names:
            raise bad_request(f"{param}.name: duplicate tool name {name!r}", param=param)
        names.add(name)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise bad_request(f"{param}.input_schema: must be a JSON schema object", param=param)
        function: dict[str, Any] = {"name": name, "parameters": schema}
        strict = tool.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise bad_request(f"{param}.strict: must be a boolean", param=param)
            function["strict"] = strict  # calls held to the schema while decoding
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise bad_request(f"{param}.description: must be a string", param=param)
            function["description"] = description
        tools.append({"type": "function", "function": function})
    return tools


def _apply_tool_choice(choice: Any, tools: list[dict[str, Any]], chat: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise bad_request("tool_choice: must be an object", param="tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        name = choice.get("name")
        known = {tool["function"]["name"] for tool in tools}
        if not isinstance(name, str) or name not in known:
            raise bad_request(
                f"tool_choice.name: {name!r} is not one of the tools", param="tool_choice"
            )
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise bad_request(
            "tool_choice.type: must be 'auto', 'any', 'none' or 'tool'", param="tool_choice"
        )
    if kind in ("any", "tool") and not tools:
        raise bad_request(f"tool_choice: {kind!r} needs tools", param="tool_choice")
    if choice.get("disable_parallel_tool_use") is True and tools:
        chat["parallel_tool_calls"] = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- non-streaming response ------------------------------------------------------------------


def thinking_signature(thinking: str) -> str:
    """A ``thinking`` block's ``signature``: Anthropic's is an opaque token clients send back
    unchanged (and some refuse an empty one). cortex signs nothing -- thinking blocks sent back
    are dropped -- so this is a digest of the text, non-empty and stable."""
    return "cortex-" + hashlib.sha256(thinking.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def message_id_from(completion_id: Any) -> str:
    """An Anthropic-style ``msg_`` id (derived from the upstream id so logs can be matched)."""
    if isinstance(completion_id, str) and completion_id:
        return "msg_" + completion_id.removeprefix("chatcmpl-")
    return random_id("msg_")


def tool_input(arguments: Any) -> dict[str, Any]:
    """OpenAI arguments (a JSON string) as Anthropic ``input`` (an object).

    Arguments that are not a JSON object are kept under ``_raw_arguments`` rather than lost.
    """
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        decoded = json.loads(arguments)
    except (TypeError, ValueError):
        decoded = None
    return decoded if isinstance(decoded, dict) else {"_raw_arguments": arguments}


def stop_reason_for(finish_reason: Any, stop_sequence: Any, has_tool_calls: bool) -> str:
    if has_tool_calls:
        return "tool_use"
    if finish_reason == "stop" and isinstance(stop_sequence, str):
        return "stop_sequence"
    return (
        STOP_REASONS.get(finish_reason, "end_turn")
        if isinstance(finish_reason, str)
        else "end_turn"
    )


def message_from_chat_completion(
    completion: dict[str, Any], model: str, *, thinking: bool = False
) -> dict[str, Any]:
    """An Anthropic ``message`` from an OpenAI ``chat.completion``; ``model`` is what was asked."""
    choice = obj((items(obj(completion).get("choices")) or [{}])[0])
    message = obj(choice.get("message"))
    content: list[dict[str, Any]] = []
    reasoning = text(message.get("reasoning_content")) or text(message.get("reasoning"))
    if thinking and reasoning:
        content.append(
            {"type": "thinking", "thinking": reasoning, "signature": thinking_signature(reasoning)}
        )
    answer = text(message.get("content"))
    if answer:
        content.append({"type": "text", "text": answer})
    calls = [c for c in items(message.get("tool_calls")) if isinstance(c, dict)]
    for call in calls:
        function = obj(call.get("function"))
        content.append(
            {
                "type": "tool_use",
                "id": text(call.get("id")) or random_id("toolu_"),
                "name": text(function.get("name")),
                "input": tool_input(function.get("arguments")),
            }
        )
    stop_reason = stop_reason_for(
        choice.get("finish_reason"), choice.get("stop_sequence"), bool(calls)
    )
    usage = obj(obj(completion).get("usage"))
    return {
        "id": message_id_from(obj(completion).get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": choice.get("stop_sequence") if stop_reason == "stop_sequence" else None,
        "usage": {
            "input_tokens": count(usage.get("prompt_tokens")),
            "output_tokens": count(usage.get("completion_tokens")),
        },
    }


# --- streaming -------------------------------------------------------------------------------


def _frame(event: str, payload: dict[str, Any]) -> bytes:
    return encode_event(event, {"type": event, **payload})


class AnthropicStreamTranslator:
    """OpenAI chunk stream -> Anthropic SSE frames; a pure state machine.

    Drive it with :meth:`start` (optional: sends ``message_start`` before the upstream answers),
    :meth:`feed` for each decoded chunk, :meth:`ping` while the upstream is quiet, then
    :meth:`finish` at the end of the upstream stream (``[DONE]`` or EOF) or :meth:`fail` when the
    upstream fails. Each returns the bytes to write. After ``finish`` or ``fail`` it is closed and
    returns nothing more.

    An upstream that ends without ``[DONE]`` is fine if it sent a finish reason; one that ends
    before any finish reason was cut off, and the client gets an ``error`` event, never a
    ``message_stop`` that would pass a truncated answer off as complete.
    """

    def __init__(
        self,
        model: str,
        *,
        message_id: str | None = None,
        input_tokens: int = 0,
        thinking: bool = False,
    ) -> None:
        self.model = model
        self.message_id = message_id or random_id("msg_")
        self.thinking = thinking
        self.started = False
        self.closed = False
        self._input_tokens = input_tokens
        self._output_tokens: int | None = None
        self._content_chunks = 0
        self._index = -1  # index of the open content block (-1: none open)
        self._open: str | None = None  # "text" | "thinking" | "tool_use"
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool index -> Anthropic block index
        self._open_tool: int | None = None  # OpenAI index of the open tool_use block
        self._has_tool_use = False
        self._finish_reason: str | None = None
        self._stop_sequence: str | None = None
        self._thinking_text: list[str] = []  # the open thinking block's text (its signature)

    def start(self) -> list[bytes]:
        if self.started or self.closed:
            return []
        self.started = True
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input_tokens, "output_tokens": 0},
        }
        return [_frame("message_start", {"message": message})]

    def ping(self) -> list[bytes]:
        """A keep-alive for a quiet upstream (a long prefill, a cold load)."""
        if self.closed:
            return []
        return [*self.start(), _frame("ping", {})]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        """One decoded ``chat.completion.chunk``."""
        if self.closed:
            return []
        chunk = obj(chunk)
        error = stream_error(chunk)
        if error is not None:  # the upstream reported a failure mid-stream
            return self.fail(error)
        # Usage first: the neuron reports the prompt's length on its first chunk (the
        # report_prompt_tokens extension), which message_start carries (Claude Code shows
        # context use from it).
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                self._input_tokens = count(usage["prompt_tokens"])
            done = usage.get("completion_tokens")
            if isinstance(done, int) and (done > 0 or not chunk.get("choices")):
                self._output_tokens = count(done)
        frames = self.start()
        for choice in items(chunk.get("choices")):
            choice = obj(choice)
            delta = obj(choice.get("delta"))
            reasoning = text(delta.get("reasoning_content")) or text(delta.get("reasoning"))
            if reasoning and self.thinking:
                frames += self._delta("thinking", {"type": "thinking_delta", "thinking": reasoning})
                self._thinking_text.append(reasoning)
            answer = text(delta.get("content"))
            if answer:
                self._content_chunks += 1
                frames += self._delta("text", {"type": "text_delta", "text": answer})
            for call in items(delta.get("tool_calls")):
                if isinstance(call, dict):
                    frames += self._tool_delta(call)
            if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
                self._finish_reason = choice["finish_reason"]
                if isinstance(choice.get("stop_sequence"), str):
                    self._stop_sequence = choice["stop_sequence"]
        return frames

    def finish(self) -> list[bytes]:
        """The upstream stream ended (with or without ``[DONE]``)."""
        if self.closed:
            return []
        if self._finish_reason is None:
            return self.fail(
                ApiError(502, "upstream_incomplete", "the upstream stream ended before finishing")
            )
        frames = [*self.start(), *self._close_block()]
        self.closed = True
        stop_reason = stop_reason_for(self._finish_reason, self._stop_sequence, self._has_tool_use)
        output_tokens = self._output_tokens
        if output_tokens is None:  # no usage frame: one token per content chunk, an estimate
            output_tokens = self._content_chunks
        frames.append(
            _frame(
                "message_delta",
                {
                    "delta": {
                        "stop_reason": stop_reason,
                        "stop_sequence": self._stop_sequence
                        if stop_reason == "stop_sequence"
                        else None,
                    },
                    "usage": {"input_tokens": self._input_tokens, "output_tokens": output_tokens},
                },
            )
        )
        frames.append(_frame("message_stop", {}))
        return frames

    def fail(self, error: ApiError) -> list[bytes]:
        """The upstream failed mid-stream: an ``error`` event ends the stream."""
        if self.closed:
            return []
        self.closed = True
        return [encode_event("error", error.anthropic_body())]

    # --- content blocks ---

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        frames = []
        if self._open == "thinking":
            signature = thinking_signature("".join(self._thinking_text))
            self._thinking_text = []
            frames.append(
                _frame(
                    "content_block_delta",
                    {
                        "index": self._index,
                        "delta": {"type": "signature_delta", "signature": signature},
                    },
                )
            )
        frames.append(_frame("content_block_stop", {"index": self._index}))
        self._open = None
        self._open_tool = None
        return frames

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        frames = self._close_block()
        self._index += 1
        self._open = kind
        frames.append(_frame("content_block_start", {"index": self._index, "content_block": block}))
        return frames

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[bytes]:
        frames: list[bytes] = []
        if self._open != kind:
            empty = {"type": "text", "text": ""}
            if kind == "thinking":
                empty = {"type": "thinking", "thinking": "", "signature": ""}
            frames += self._open_block(kind, empty)
        frames.append(_frame("content_block_delta", {"index": self._index, "delta": delta}))
        return frames

    def _tool_delta(self, call: dict[str, Any]) -> list[bytes]:
        index = count(call.get("index"))
        function = obj(call.get("function"))
        arguments = function.get("arguments")
        frames: list[bytes] = []
        if index not in self._tool_blocks:
            block = {
                "type": "tool_use",
                "id": text(call.get("id")) or random_id("toolu_"),
                "name": text(function.get("name")),
                "input": {},
            }
            frames += self._open_block("tool_use", block)
            self._tool_blocks[index] = self._index
            self._open_tool = index
            self._has_tool_use = True
        elif self._open_tool != index:
            # Anthropic blocks cannot interleave; OpenAI servers send calls one after another.
            log.warning("tool call %s continued after another began; arguments dropped", index)
            return frames
        if isinstance(arguments, str) and arguments:
            frames.append(
                _frame(
                    "content_block_delta",
                    {
                        "index": self._index,
                        "delta": {"type": "input_json_delta", "partial_json": arguments},
                    },
                )
            )
        return frames


__all__ = [
    "AnthropicStreamTranslator",
    "CountTokensRequest",
    "MessagesRequest",
    "anthropic_error_type",
    "count_tokens_response",
    "message_from_chat_completion",
    "parse_count_tokens_request",
    "parse_messages_request",
    "stop_reason_for",
    "tool_input",
]
