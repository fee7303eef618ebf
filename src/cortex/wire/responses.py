"""OpenAI Responses API <-> chat completions (pure translation, no I/O).

Agents built on ``/v1/responses`` talk to the same neurons as everyone else: the gateway turns
a Responses request into a ``chat.completions`` body (:func:`parse_responses_request`), and the
neuron's answer back into a ``response`` object (:func:`response_from_chat_completion`) or the
Responses event stream (:class:`ResponsesStreamTranslator`). cortex keeps no conversation state,
so ``previous_response_id``, ``store: true`` and other server-side features are refused with a
clear 400 rather than silently ignored. Mapping rules are listed in docs/clients.md.

Every request field of the spec is in exactly one of :data:`HANDLED_FIELDS`, :data:`IGNORED_FIELDS`
(accepted and not acted on, each with the reason docs/clients.md gives) or refused with a 400 when
set to something cortex cannot honour (tests/wire/test_request_fields.py walks the official spec).

Tools: ``function`` tools go to the model; a ``namespace`` (a client-side group of function
tools, Codex sends one on every request) is flattened into its functions, and a call to one of
them comes back as a ``function_call`` with its ``namespace``. Tools only OpenAI's servers can
run (``web_search``, ``file_search``, ...) follow the gateway's ``hosted_tools`` policy: dropped
and named in :attr:`ResponsesRequest.dropped_tools` (the gateway logs them and answers with an
``x-cortex-dropped-tools`` header), or refused with a 400 in strict mode.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs

from cortex.wire.errors import ApiError, bad_request
from cortex.wire.openai_types import count, items, obj, random_id, stream_error, text
from cortex.wire.sse import COMMENT_KEEPALIVE, encode_event

log = logging.getLogger(__name__)

# Input item types that carry nothing a chat model can use; accepted and skipped quietly.
_SKIPPED_ITEMS = {"reasoning"}

# What a tool that only the API provider's servers can run becomes (``[gateway] hosted_tools``).
DROP = "drop"
REFUSE = "refuse"
HOSTED_TOOL_POLICIES = (DROP, REFUSE)

# Request fields cortex acts on (docs/clients.md, "Responses -> chat completions").
HANDLED_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "metadata",
        "text",
        "store",
        "background",
        "previous_response_id",
        "conversation",
        "prompt",
        "top_logprobs",
        "include",
        "truncation",
    }
)
# Accepted and not acted on, on purpose; the reason is what docs/clients.md says.
IGNORED_FIELDS = {
    "user": "an end-user id for the provider's abuse monitoring; cortex keeps none",
    "safety_identifier": "an end-user id for the provider's abuse monitoring",
    "prompt_cache_key": "a hint for the provider's prompt cache; cortex has no cross-request cache",
    "prompt_cache_retention": "the provider's prompt cache lifetime",
    "service_tier": "the provider's processing tier; every cortex request is served alike",
    "reasoning": "effort and summary settings: open models reason as their template makes "
    "them; echoed in the response",
    "stream_options": "include_obfuscation: cortex does not pad stream events",
    "max_tool_calls": "a limit on calls to hosted tools, which cortex never runs",
    "context_management": "server-side compaction of stored conversations; cortex stores none",
    "client_metadata": "Codex's request metadata (not in the spec)",
}
# ``include`` values cortex satisfies as is (nothing to add) or cannot produce on purpose.
_INCLUDE_IGNORED = {
    "reasoning.encrypted_content",  # reasoning comes back as plain reasoning_text instead
    "web_search_call.action.sources",  # hosted tools never run
    "web_search_call.results",
    "file_search_call.results",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "message.input_image.image_url",  # image input is refused anyway
}
# Parameters that need server-side state or features cortex does not have.
_REFUSED_IF_SET = {
    "previous_response_id": "cortex keeps no conversation state: send the whole conversation "
    "in 'input' instead of previous_response_id",
    "conversation": "cortex keeps no conversation state: send the whole conversation in 'input'",
    "prompt": "stored prompt templates are not supported by cortex",
}


@attrs.frozen
class ResponsesRequest:
    """A validated Responses request: the neuron's chat body and what the response echoes."""

    model: str
    stream: bool
    chat: dict[str, Any]  # the OpenAI chat.completions request body for the neuron
    echo: dict[str, Any]  # request parameters a response object repeats back
    ignored_items: tuple[str, ...] = ()  # input item types that were skipped (logged)
    # Hosted tools dropped under the "drop" policy (their types, in request order).
    dropped_tools: tuple[str, ...] = ()
    # Flattened function name -> (namespace, name inside it), for calls to namespaced tools.
    namespaced: dict[str, tuple[str, str]] = attrs.field(factory=dict)


# --- request ---------------------------------------------------------------------------------


def parse_responses_request(body: Any, *, hosted_tools: str = DROP) -> ResponsesRequest:
    """Validate a Responses request and build the OpenAI chat request from it.
    ``hosted_tools``: what a tool only the provider can run becomes (:data:`DROP` or
    :data:`REFUSE`)."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("model: a non-empty string is required", param="model")
    for name, reason in _REFUSED_IF_SET.items():
        if body.get(name) is not None:
            raise bad_request(f"{name}: {reason}", param=name, code="unsupported_parameter")
    if body.get("store") is True:
        raise bad_request(
            "store: cortex does not store responses; send store=false (or omit it)",
            param="store",
            code="unsupported_parameter",
        )
    if body.get("background") is True:
        raise bad_request(
            "background: background responses are not supported by cortex",
            param="background",
            code="unsupported_parameter",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream: must be a boolean", param="stream")

    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("instructions: must be a string", param="instructions")
    system_parts = [instructions] if instructions else []
    ignored: list[str] = []
    dropped: list[str] = []
    tools, namespaced = _tools(body.get("tools"), hosted_tools, dropped)
    flat_names = {(ns, name): flat for flat, (ns, name) in namespaced.items()}
    messages = _input_messages(body.get("input"), system_parts, ignored, flat_names)
    if system_parts:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system_parts)})
    if ignored:
        log.warning("responses: skipped input items of unknown type(s): %s", sorted(set(ignored)))

    chat: dict[str, Any] = {"model": model, "messages": messages}
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    max_output_tokens = body.get("max_output_tokens")
    if max_output_tokens is not None:
        if not _is_int(max_output_tokens) or max_output_tokens < 1:
            raise bad_request(
                "max_output_tokens: must be an integer >= 1", param="max_output_tokens"
            )
        chat["max_tokens"] = max_output_tokens
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not 0 <= value <= high:
            raise bad_request(f"{name}: must be a number between 0 and {high}", param=name)
        chat[name] = value
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls: must be a boolean", param="parallel_tool_calls")
    if tools:
        chat["tools"] = tools
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        chat["tool_choice"] = _tool_choice(tool_choice, tools, flat_names)
    response_format = _text_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("metadata: must be an object", param="metadata")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20):
        raise bad_request("top_logprobs: must be an integer from 0 to 20", param="top_logprobs")
    # log-probabilities come back when include names them (top_logprobs alone asks too)
    if _check_include(body.get("include")) or top_logprobs:
        chat["logprobs"] = True
        chat["top_logprobs"] = top_logprobs or 0
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise bad_request("truncation: must be 'auto' or 'disabled'", param="truncation")

    echo = {
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "metadata": metadata or {},
        "parallel_tool_calls": True if parallel is None else parallel,
        "reasoning": _reasoning_echo(body.get("reasoning")),
        "temperature": chat.get("temperature"),
        "text": body.get("text") if response_format is not None else {"format": {"type": "text"}},
        "tool_choice": tool_choice if tool_choice is not None else "auto",
        "tools": body.get("tools") or [],
        "top_p": chat.get("top_p"),
        "truncation": truncation or "disabled",
    }
    if isinstance(body.get("user"), str):  # the schema allows it absent, not null
        echo["user"] = body["user"]
    return ResponsesRequest(model, stream, chat, echo, tuple(ignored), tuple(dropped), namespaced)


LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _check_include(include: Any) -> bool:
    """Refuse what cortex cannot include; True when the output text's logprobs are asked
    for."""
    if include is None:
        return False
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise bad_request("include: must be a list of strings", param="include")
    for value in include:
        if value not in _INCLUDE_IGNORED and value != LOGPROBS_INCLUDE:
            raise bad_request(
                f"include: {value!r} is not supported by cortex",
                param="include",
                code="unsupported_parameter",
            )
    return LOGPROBS_INCLUDE in include


_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
_SUMMARIES = ("auto", "concise", "detailed")


def _reasoning_echo(reasoning: Any) -> dict[str, Any] | None:
    """The ``reasoning`` settings repeated in the response (accepted, not acted on): only
    values the client's own types accept, so a typo cannot break the client's parsing."""
    if not isinstance(reasoning, dict):
        return None
    effort, summary = reasoning.get("effort"), reasoning.get("summary")
    return {
        "effort": effort if effort in _EFFORTS else None,
        "summary": summary if summary in _SUMMARIES else None,
    }


def _input_messages(
    raw: Any,
    system_parts: list[str],
    ignored: list[str],
    flat_names: dict[tuple[str, str], str] | None = None,
) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad_request("input: a string or a non-empty list of items is required", param="input")
    out: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"{param}: must be an object", param=param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind is not None and not isinstance(kind, str):
            raise bad_request(f"{param}.type: must be a string", param=param)
        if kind == "message":
            _message_item(item, param, out, system_parts)
        elif kind == "function_call":
            _function_call_item(item, param, out, flat_names or {})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"{param}.call_id: must be a non-empty string", param=param)
            text = _parts_text(item.get("output"), f"{param}.output", ("input_text", "output_text"))
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind in _SKIPPED_ITEMS:
            continue
        else:
            ignored.append(str(kind))
    if not out:
        raise bad_request("input: no message to answer", param="input")
    return out


def _message_item(
    item: dict[str, Any], param: str, out: list[dict[str, Any]], system_parts: list[str]
) -> None:
    role = item.get("role")
    if role in ("system", "developer", "user") and item.get("content") is None:
        # as chat and messages answer (and OpenAI): a message without content is a mistake,
        # not an empty turn (an assistant item may leave it out: its calls follow as items)
        raise bad_request(
            f"{param}.content: required for a {role} message", param=f"{param}.content"
        )
    if role in ("system", "developer"):
        text = _parts_text(item.get("content"), f"{param}.content", ("input_text", "text"))
        if text:
            system_parts.append(text)
        return
    if role == "user":
        text = _parts_text(item.get("content"), f"{param}.content", ("input_text", "text"))
        out.append({"role": "user", "content": text})
        return
    if role == "assistant":
        text = _parts_text(
            item.get("content"),
            f"{param}.content",
            ("output_text", "input_text", "text", "refusal"),
        )
        out.append({"role": "assistant", "content": text})
        return
    raise bad_request(
        f"{param}.role: must be 'user', 'assistant', 'system' or 'developer' (got {role!r})",
        param=param,
    )


def _function_call_item(
    item: dict[str, Any],
    param: str,
    out: list[dict[str, Any]],
    flat_names: dict[tuple[str, str], str],
) -> None:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{param}.call_id: must be a non-empty string", param=param)
    if not isinstance(name, str) or not name:
        raise bad_request(f"{param}.name: must be a non-empty string", param=param)
    namespace = item.get("namespace")
    if isinstance(namespace, str) and namespace:  # the name the model saw for it
        name = flat_names.get((namespace, name), name)
    if not isinstance(arguments, str):
        raise bad_request(f"{param}.arguments: must be a JSON string", param=param)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant":  # one assistant turn: text + calls
        last.setdefault("tool_calls", []).append(call)
        if not last.get("content"):
            last["content"] = None
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _parts_text(content: Any, param: str, allowed: tuple[str, ...]) -> str:
    """A string, or the text of a list of content parts (non-text parts refused)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad_request(f"{param}: must be a string or a list of content parts", param=param)
    texts = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise bad_request(
                f"{where}: content part type {kind!r} is not supported (text only: "
                f"{', '.join(allowed)})",
                param=where,
            )
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise bad_request(f"{where}.text: must be a string", param=where)
        texts.append(text)
    return "".join(texts)


def _tools(
    raw: Any, hosted_tools: str, dropped: list[str]
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """The chat function tools, and which flattened names came from a namespace."""
    if raw is None:
        return [], {}
    if not isinstance(raw, list):
        raise bad_request("tools: must be a list", param="tools")
    tools: list[dict[str, Any]] = []
    namespaced: dict[str, tuple[str, str]] = {}
    members: list[tuple[str, str, dict[str, Any], str]] = []  # (ns, name, tool, param)
    for index, tool in enumerate(raw):
        param = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise bad_request(f"{param}: must be an object", param=param)
        kind = tool.get("type")
        if kind == "function":
            tools.append(_function_tool(tool, param))
        elif kind == "namespace":
            namespace = tool.get("name")
            if not isinstance(namespace, str) or not namespace:
                raise bad_request(f"{param}.name: must be a non-empty string", param=param)
            inner = tool.get("tools")
            if not isinstance(inner, list):
                raise bad_request(f"{param}.tools: must be a list of tools", param=param)
            for position, member in enumerate(inner):
                where = f"{param}.tools[{position}]"
                if not isinstance(member, dict):
                    raise bad_request(f"{where}: must be an object", param=where)
                if member.get("type") != "function":
                    _hosted_tool(member.get("type"), where, hosted_tools, dropped)
                    continue
                function = _function_tool(member, where)
                members.append((namespace, function["function"]["name"], function, where))
        else:
            _hosted_tool(kind, f"{param}.type", hosted_tools, dropped)
    # Namespaced functions keep their own name unless it collides, then "namespace__name".
    taken = [tool["function"]["name"] for tool in tools]
    counts: dict[str, int] = {}
    for _ns, name, _tool, _where in members:
        counts[name] = counts.get(name, 0) + 1
    for namespace, name, function, where in members:
        flat = name
        if name in taken or counts[name] > 1:
            flat = f"{namespace}__{name}"
        if flat in taken:
            raise bad_request(f"{where}.name: duplicate tool name {flat!r}", param=where)
        function["function"]["name"] = flat
        taken.append(flat)
        namespaced[flat] = (namespace, name)
        tools.append(function)
    return tools, namespaced


def _function_tool(tool: dict[str, Any], param: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{param}.name: must be a non-empty string", param=param)
    parameters = tool.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(f"{param}.parameters: must be a JSON schema object", param=param)
    function: dict[str, Any] = {"name": name, "parameters": parameters}
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
    return {"type": "function", "function": function}


def _hosted_tool(kind: Any, param: str, policy: str, dropped: list[str]) -> None:
    """A tool cortex cannot offer the model: dropped (and named) or refused, per policy."""
    if policy == DROP and isinstance(kind, str) and kind:
        dropped.append(kind)
        return
    raise bad_request(
        f"{param}: hosted tool {kind!r} is not supported; cortex runs function tools only "
        "({'type': 'function', 'name', 'parameters'}); the gateway refuses hosted tools "
        "because [gateway] hosted_tools = 'refuse'"
        if policy == REFUSE
        else f"{param}: a tool needs a 'type'",
        param=param,
        code="unsupported_tool",
    )


def _tool_choice(
    choice: Any, tools: list[dict[str, Any]], flat_names: dict[tuple[str, str], str]
) -> Any:
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise bad_request("tool_choice: 'required' needs tools", param="tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        namespace = choice.get("namespace")
        if isinstance(namespace, str):
            name = flat_names.get((namespace, name), name)  # type: ignore[arg-type]
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise bad_request(
                f"tool_choice.name: {name!r} is not one of the tools", param="tool_choice"
            )
        return {"type": "function", "function": {"name": name}}
    raise bad_request(
        "tool_choice: must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
        param="tool_choice",
    )


def _text_format(value: Any) -> dict[str, Any] | None:
    """``text.format``: ``text`` (nothing to enforce), ``json_object``, or ``json_schema``
    (``name``, ``schema``, ``strict``) as the chat request's ``response_format``, enforced
    while decoding."""
    if value is None:
        return None
    fmt = value.get("format") if isinstance(value, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise bad_request(
                "text.format.schema: must be a JSON Schema object", param="text.format.schema"
            )
        spec = {"name": text(fmt.get("name"), "output"), "schema": schema}
        if isinstance(fmt.get("strict"), bool):
            spec["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": spec}
    raise bad_request(
        f"text.format: {kind!r} is not supported (text, json_object or json_schema)",
        param="text.format",
        code="unsupported_parameter",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- response objects ------------------------------------------------------------------------


def response_id() -> str:
    return random_id("resp_")


def _item_id(response: str, prefix: str, index: int) -> str:
    """Item ids derived from the response id (stable in tests, traceable in logs)."""
    return f"{prefix}_{response.removeprefix('resp_')}_{index}"


def usage_object(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _status_for(finish_reason: Any) -> tuple[str, dict[str, str] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_object(
    request: ResponsesRequest,
    *,
    id: str,
    created_at: float,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete_details: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``response`` object (the non-streaming answer and every snapshot in a stream).
    ``created_at`` is whole seconds (the spec's integer); ``usage`` is left out until known
    (the schema allows it absent, not null)."""
    response = {
        "id": id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "error": error,
        "incomplete_details": incomplete_details,
        "model": request.model,
        "output": output,
        "previous_response_id": None,
        "store": False,
        **request.echo,
    }
    if usage is not None:
        response["usage"] = usage
    return response


def _message_item_object(
    item_id: str, text: str, status: str, logprobs: list[Any] | None = None
) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [_output_text(text, logprobs)],
    }


def _output_text(text: str, logprobs: list[Any] | None = None) -> dict[str, Any]:
    """An ``output_text`` part; ``logprobs`` are the chat answer's entries (the same shape:
    token, logprob, bytes, top_logprobs)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _logprob_entries(choice: dict[str, Any]) -> list[Any]:
    return [e for e in items(obj(choice.get("logprobs")).get("content")) if isinstance(e, dict)]


def _reasoning_item_object(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _function_call_object(
    item_id: str,
    call_id: str,
    name: str,
    arguments: str,
    status: str,
    namespaced: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """A ``function_call`` item; a call to a flattened namespace tool names its namespace and
    its own name again, as the client declared them."""
    item = {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
    origin = (namespaced or {}).get(name)
    if origin is not None:
        item["namespace"], item["name"] = origin
    return item


def response_from_chat_completion(
    completion: dict[str, Any],
    request: ResponsesRequest,
    *,
    id: str | None = None,
    created_at: float | None = None,
) -> dict[str, Any]:
    """A ``response`` object from the neuron's ``chat.completion``."""
    id = id or response_id()
    choice = obj((items(obj(completion).get("choices")) or [{}])[0])
    message = obj(choice.get("message"))
    status, incomplete = _status_for(choice.get("finish_reason"))
    item_status = "incomplete" if status == "incomplete" else "completed"
    output: list[dict[str, Any]] = []
    reasoning = text(message.get("reasoning_content")) or text(message.get("reasoning"))
    if reasoning:
        output.append(
            _reasoning_item_object(_item_id(id, "rs", len(output)), reasoning, "completed")
        )
    answer = text(message.get("content"))
    if answer:
        output.append(
            _message_item_object(
                _item_id(id, "msg", len(output)), answer, item_status, _logprob_entries(choice)
            )
        )
    for call in items(message.get("tool_calls")):
        function = obj(obj(call).get("function"))
        output.append(
            _function_call_object(
                _item_id(id, "fc", len(output)),
                text(obj(call).get("id")) or random_id("call_"),
                text(function.get("name")),
                text(function.get("arguments"), "{}"),
                "completed",
                request.namespaced,
            )
        )
    usage = obj(obj(completion).get("usage"))
    return response_object(
        request,
        id=id,
        created_at=time.time() if created_at is None else created_at,
        status=status,
        output=output,
        usage=usage_object(
            count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
        ),
        incomplete_details=incomplete,
    )


# --- streaming -------------------------------------------------------------------------------


@attrs.define
class _OpenItem:
    """The output item being streamed."""

    kind: str  # "message" | "reasoning" | "function_call"
    output_index: int
    id: str
    text: str = ""  # message text, reasoning text, or function arguments
    logprobs: list[Any] = attrs.field(factory=list)  # a message's, when asked for
    call_id: str = ""
    name: str = ""
    tool_index: int = -1


class ResponsesStreamTranslator:
    """OpenAI chunk stream -> Responses SSE events; a pure state machine.

    Drive it with :meth:`start` (``response.created`` + ``response.in_progress``), :meth:`feed`
    for each decoded chunk, :meth:`ping` while the upstream is quiet (an SSE comment: the
    Responses family has no ping event), then :meth:`finish` at the end of the upstream stream or
    :meth:`fail` when it fails. Every event carries its ``type`` and a 0-based, gap-free
    ``sequence_number``. An upstream that ends before a finish reason was cut off: the client
    gets ``error`` + ``response.failed``, never a ``response.completed``.
    """

    def __init__(
        self,
        request: ResponsesRequest,
        *,
        response_id_: str | None = None,
        created_at: float | None = None,
    ) -> None:
        self.request = request
        self.id = response_id_ or response_id()
        self.created_at = int(time.time() if created_at is None else created_at)
        self.started = False
        self.closed = False
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._open: _OpenItem | None = None
        self._tool_items: set[int] = set()
        self._finish_reason: str | None = None
        self._usage = (0, 0)
        self._saw_usage = False
        self._content_chunks = 0

    # --- public driving API ---

    def start(self) -> list[bytes]:
        if self.started or self.closed:
            return []
        self.started = True
        snapshot = self._snapshot("in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def ping(self) -> list[bytes]:
        if self.closed:
            return []
        return [*self.start(), COMMENT_KEEPALIVE]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        """One decoded ``chat.completion.chunk``."""
        if self.closed:
            return []
        chunk = obj(chunk)
        error = stream_error(chunk)
        if error is not None:  # the upstream reported a failure mid-stream
            return self.fail(error)
        frames = self.start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._saw_usage = True
            self._usage = (count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")))
        for choice in items(chunk.get("choices")):
            choice = obj(choice)
            delta = obj(choice.get("delta"))
            reasoning = text(delta.get("reasoning_content")) or text(delta.get("reasoning"))
            if reasoning:
                frames += self._text_delta("reasoning", reasoning)
            answer = text(delta.get("content"))
            if answer:
                self._content_chunks += 1
                frames += self._text_delta("message", answer, _logprob_entries(choice))
            for call in items(delta.get("tool_calls")):
                if isinstance(call, dict):
                    frames += self._tool_delta(call)
            if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
                self._finish_reason = choice["finish_reason"]
        return frames

    def finish(self) -> list[bytes]:
        if self.closed:
            return []
        if self._finish_reason is None:
            return self.fail(
                ApiError(502, "upstream_incomplete", "the upstream stream ended before finishing")
            )
        frames = [*self.start(), *self._close_item()]
        self.closed = True
        status, incomplete = _status_for(self._finish_reason)
        input_tokens, output_tokens = self._usage
        if not self._saw_usage:  # no usage frame: one token per content chunk, an estimate
            output_tokens = self._content_chunks
        snapshot = self._snapshot(
            status, usage=usage_object(input_tokens, output_tokens), incomplete=incomplete
        )
        name = "response.completed" if status == "completed" else "response.incomplete"
        frames.append(self._event(name, response=snapshot))
        return frames

    def fail(self, error: ApiError) -> list[bytes]:
        """The upstream failed: ``error`` then ``response.failed`` end the stream."""
        if self.closed:
            return []
        frames = self.start()
        # The item being streamed ends too (as incomplete) and stays in the failed response's
        # output: a client that assembled the deltas sees every item it was shown closed.
        frames += self._close_item(failed=True)
        self.closed = True
        frames.append(
            self._event("error", code=error.code, message=error.message, param=error.param)
        )
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        snapshot = self._snapshot("failed", error={"code": code, "message": error.message})
        frames.append(self._event("response.failed", response=snapshot))
        return frames

    # --- internals ---

    def _event(self, kind: str, **payload: Any) -> bytes:
        frame = encode_event(kind, {"type": kind, "sequence_number": self._sequence, **payload})
        self._sequence += 1
        return frame

    def _snapshot(
        self,
        status: str,
        *,
        usage: dict[str, Any] | None = None,
        incomplete: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return response_object(
            self.request,
            id=self.id,
            created_at=self.created_at,
            status=status,
            output=list(self._output),
            usage=usage,
            incomplete_details=incomplete,
            error=error,
        )

    def _open_item(self, item: _OpenItem) -> list[bytes]:
        self._open = item
        frames = [
            self._event(
                "response.output_item.added",
                output_index=item.output_index,
                item=self._item_object(item, "in_progress"),
            )
        ]
        if item.kind in ("message", "reasoning"):
            part = (
                _output_text("")
                if item.kind == "message"
                else {"type": "reasoning_text", "text": ""}
            )
            frames.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=item.output_index,
                    content_index=0,
                    part=part,
                )
            )
        return frames

    def _item_object(self, item: _OpenItem, status: str) -> dict[str, Any]:
        if item.kind == "message":
            done = status != "in_progress"
            obj = _message_item_object(item.id, item.text, status, item.logprobs)
            if not done:
                obj["content"] = []
            return obj
        if item.kind == "reasoning":
            obj = _reasoning_item_object(item.id, item.text, status)
            if status == "in_progress":
                obj["content"] = []
            return obj
        return _function_call_object(
            item.id, item.call_id, item.name, item.text, status, self.request.namespaced
        )

    def _close_item(self, *, failed: bool = False) -> list[bytes]:
        item = self._open
        if item is None:
            return []
        self._open = None
        ids = {"item_id": item.id, "output_index": item.output_index}
        frames = []
        if item.kind == "message":
            frames.append(
                self._event(
                    "response.output_text.done",
                    **ids,
                    content_index=0,
                    text=item.text,
                    logprobs=item.logprobs,
                )
            )
            frames.append(
                self._event(
                    "response.content_part.done",
                    **ids,
                    content_index=0,
                    part=_output_text(item.text, item.logprobs),
                )
            )
        elif item.kind == "reasoning":
            frames.append(
                self._event("response.reasoning_text.done", **ids, content_index=0, text=item.text)
            )
            frames.append(
                self._event(
                    "response.content_part.done",
                    **ids,
                    content_index=0,
                    part={"type": "reasoning_text", "text": item.text},
                )
            )
        else:
            frames.append(
                self._event(
                    "response.function_call_arguments.done",
                    **ids,
                    name=item.name,
                    arguments=item.text or "{}",
                )
            )
            item.text = item.text or "{}"
        status = "completed"
        if failed or (
            item.kind == "message" and _status_for(self._finish_reason)[0] == "incomplete"
        ):
            status = "incomplete"
        done = self._item_object(item, status)
        self._output.append(done)
        frames.append(
            self._event("response.output_item.done", output_index=item.output_index, item=done)
        )
        return frames

    def _text_delta(self, kind: str, text: str, logprobs: list[Any] | None = None) -> list[bytes]:
        frames: list[bytes] = []
        if self._open is None or self._open.kind != kind:
            frames += self._close_item()
            index = len(self._output)
            prefix = "msg" if kind == "message" else "rs"
            frames += self._open_item(_OpenItem(kind, index, _item_id(self.id, prefix, index)))
        item = self._open
        assert item is not None
        item.text += text
        item.logprobs.extend(logprobs or ())
        name = (
            "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        )
        extra: dict[str, Any] = {"logprobs": logprobs or []} if kind == "message" else {}
        frames.append(
            self._event(
                name,
                item_id=item.id,
                output_index=item.output_index,
                content_index=0,
                delta=text,
                **extra,
            )
        )
        return frames

    def _tool_delta(self, call: dict[str, Any]) -> list[bytes]:
        index = count(call.get("index"))
        function = obj(call.get("function"))
        arguments = function.get("arguments")
        frames: list[bytes] = []
        if index not in self._tool_items:
            self._tool_items.add(index)
            frames += self._close_item()
            output_index = len(self._output)
            frames += self._open_item(
                _OpenItem(
                    "function_call",
                    output_index,
                    _item_id(self.id, "fc", output_index),
                    call_id=text(call.get("id")) or random_id("call_"),
                    name=text(function.get("name")),
                    tool_index=index,
                )
            )
        elif self._open is None or self._open.tool_index != index:
            log.warning("tool call %s continued after another began; arguments dropped", index)
            return frames
        item = self._open
        assert item is not None
        if isinstance(arguments, str) and arguments:
            item.text += arguments
            frames.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=item.output_index,
                    delta=arguments,
                )
            )
        return frames


__all__ = [
    "ResponsesRequest",
    "ResponsesStreamTranslator",
    "parse_responses_request",
    "response_from_chat_completion",
    "response_id",
    "response_object",
    "usage_object",
]
