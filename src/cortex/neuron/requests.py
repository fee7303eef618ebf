"""OpenAI ``/v1/chat/completions`` and ``/v1/completions`` bodies -> attrs types, or a clear 400.

Parsed by hand from the raw JSON (no pydantic on the hot path): each wrong type or value gets a
400 naming the parameter, and parameters we do not implement (``best_of``, ``echo``,
``functions``, ``audio``, ...) are refused loudly instead of being silently ignored. Every field
of the OpenAI spec is either handled, refused when set, or in :data:`IGNORED_FIELDS` with the
reason docs/clients.md gives (tests/wire/test_request_fields.py walks the spec). Keys outside the
spec are ignored, as most OpenAI-compatible servers do.

Content parts other than text (``image_url``, ``input_audio``, ``file``) are refused with a
typed 400 ``unsupported_content`` naming the part unless the loaded model says it takes them
(:func:`check_content_parts`): a model that cannot see an image must not answer as if there
were none.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from cortex.harness import ResponseFormat, SamplingParams, ToolCallFormat, ToolSchema
from cortex.wire.errors import ApiError, bad_request

MAX_STOPS = 16

# Spec fields accepted and not acted on, on purpose; the reason is what docs/clients.md says.
IGNORED_FIELDS = {
    "user": "an end-user id for the provider's abuse monitoring; cortex keeps none",
    "safety_identifier": "an end-user id for the provider's abuse monitoring",
    "metadata": "tags for stored completions; cortex stores none",
    "prompt_cache_key": "a hint for the provider's prompt cache",
    "prompt_cache_retention": "the provider's prompt cache lifetime",
    "service_tier": "the provider's processing tier; every cortex request is served alike",
    "reasoning_effort": "open models reason as their chat template makes them",
    "verbosity": "a hint for OpenAI's models; open models answer as they do",
    "prediction": "predicted output only speeds up OpenAI's decoding; the answer is the same",
    "parallel_tool_calls": "the model may call several tools; false is a hint it may not follow",
}
# Spec fields cortex reads: honoured, or refused when set to what it cannot do (best_of,
# functions, web_search_options, audio, ...).
HANDLED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "temperature",
        "top_p",
        "n",
        "best_of",
        "stream",
        "stream_options",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "tools",
        "tool_choice",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "response_format",
        "store",
        "echo",
        "suffix",
        "functions",
        "function_call",
        "web_search_options",
        "audio",
        "modalities",
    }
)


@attrs.frozen
class GenerationOptions:
    """What both endpoints share: sampling, limits, stop strings, streaming."""

    model: str
    sampling: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    # ``"cortex": {"clamp_max_tokens": true}``: a max_tokens over the context left is a ceiling
    # (clamped), not a 400. The gateway sets it on translated Anthropic / Responses requests.
    clamp_max_tokens: bool = False
    # ``"cortex": {"report_prompt_tokens": true}``: the first chunk of a stream carries
    # ``usage`` with the prompt's length (the gateway's Anthropic message_start needs it).
    report_prompt_tokens: bool = False
    # how many answers (choices) to generate for the prompt
    n: int = 1


@attrs.frozen
class ChatRequest:
    options: GenerationOptions
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None


@attrs.frozen
class CompletionRequest:
    options: GenerationOptions
    prompt_text: str | None
    prompt_ids: list[int] | None


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{key}' must be a number, got {value!r}", param=key)
    if not low <= value <= high:
        raise bad_request(f"'{key}' must be between {low:g} and {high:g}, got {value!r}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer, got {value!r}", param=key)
    if low is not None and value < low:
        raise bad_request(f"'{key}' must be at least {low}, got {value}", param=key)
    return value


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false, got {value!r}", param=key)
    return value


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", message, param=param)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOPS:
            raise bad_request(f"'stop' takes at most {MAX_STOPS} strings", param="stop")
        return tuple(s for s in value if s)
    raise bad_request("'stop' must be a string or a list of strings", param="stop")


MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's bound)
MAX_N = 16  # choices per request (each is a generation of its own on the device)
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' integer logprobs (OpenAI's bound)


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat: ``logprobs: true`` asks for the tokens' log-probabilities, ``top_logprobs: k``
    (0-20, needs ``logprobs``) for the k most likely alternatives too."""
    wanted = _bool(body, "logprobs")
    top = _integer(body, "top_logprobs", low=0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise bad_request(
            f"'top_logprobs' must be at most {MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs"
        )
    if top and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    """Completions: ``logprobs: k`` (0-5) asks for the tokens' log-probabilities and the k most
    likely alternatives of each."""
    value = _integer(body, "logprobs", low=0)
    if value is not None and value > MAX_COMPLETION_LOGPROBS:
        raise bad_request(
            f"'logprobs' must be at most {MAX_COMPLETION_LOGPROBS}, got {value}",
            param="logprobs",
        )
    if body.get("top_logprobs") is not None:
        raise bad_request(
            "'top_logprobs' is a chat parameter; /v1/completions takes 'logprobs': <k>",
            param="top_logprobs",
        )
    return value


def _response_format(value: Any) -> ResponseFormat | None:
    """``response_format``: ``text`` (nothing to enforce), ``json_object``, or ``json_schema``
    with ``json_schema.schema`` (the JSON Schema the answer must validate against)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(
                "response_format.json_schema must be an object with a 'schema'",
                param="response_format.json_schema",
            )
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise bad_request(
                "response_format.json_schema.schema must be a JSON Schema object",
                param="response_format.json_schema.schema",
            )
        return ResponseFormat("json_schema", json.dumps(schema))
    raise bad_request(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}",
        param="response_format",
    )


def _options(body: dict[str, Any], completion: bool = False) -> GenerationOptions:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    n = _integer(body, "n", low=1) or 1
    if n > MAX_N:
        raise bad_request(f"'n' must be at most {MAX_N}, got {n}", param="n")
    best_of = _integer(body, "best_of")
    if best_of is not None and best_of != 1:
        raise _unsupported(f"best_of is not supported (got {best_of})", "best_of")
    logprobs = _completion_logprobs(body) if completion else _chat_logprobs(body)
    if body.get("logit_bias") not in (None, {}):
        raise _unsupported("logit_bias is not supported by this server", "logit_bias")
    if body.get("store") not in (None, False):
        raise _unsupported("store: cortex does not store completions", "store")
    response_format = _response_format(body.get("response_format"))
    max_tokens = _integer(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", low=1)
    top_k = _integer(body, "top_k", low=-1)
    seed = _integer(body, "seed")
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=max(0, top_k or 0),
        seed=seed,
        repetition_penalty=_number(body, "repetition_penalty", 0.01, 10.0, 1.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        logprobs=logprobs,
        response_format=response_format,
    )
    if sampling.top_p == 0.0:
        raise bad_request("'top_p' must be greater than 0", param="top_p")
    stream = _bool(body, "stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad_request("'stream_options' must be an object", param="stream_options")
        include_usage = _bool(stream_options, "include_usage")
    extension = _extension(body)
    return GenerationOptions(
        model=model,
        n=n,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=_stops(body),
        stream=stream,
        include_usage=include_usage,
        clamp_max_tokens=extension.get("clamp_max_tokens", False),
        report_prompt_tokens=extension.get("report_prompt_tokens", False),
    )


EXTENSION_FLAGS = ("clamp_max_tokens", "report_prompt_tokens")


def _extension(body: dict[str, Any]) -> dict[str, bool]:
    """The ``cortex`` request extension (docs/clients.md): an object of known boolean flags."""
    value = body.get("cortex")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("'cortex' must be an object of extension flags", param="cortex")
    for key, flag in value.items():
        if key not in EXTENSION_FLAGS:
            known = ", ".join(EXTENSION_FLAGS)
            raise bad_request(f"cortex.{key}: unknown extension (known: {known})", param="cortex")
        if not isinstance(flag, bool):
            raise bad_request(f"cortex.{key} must be true or false", param="cortex")
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(
                f"messages[{i}].role must be system, developer, user, assistant or tool, "
                f"got {role!r}",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is None and role != "assistant":
            # OpenAI answers 400 too; only an assistant turn may leave it out (tool calls)
            raise bad_request(
                f"messages[{i}].content is required for a {role} message",
                param=f"messages[{i}].content",
            )
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"messages[{i}].content must be a string or a list of parts",
                param=f"messages[{i}].content",
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise bad_request(
                        f"messages[{i}].content[{j}] must be an object with a 'type'",
                        param=f"messages[{i}].content[{j}]",
                    )
        if role == "assistant" and message.get("function_call") is not None:
            raise _unsupported(
                f"messages[{i}].function_call: the legacy function-call shape is not "
                "supported; send tool_calls",
                f"messages[{i}].function_call",
            )
    # ``developer`` is the newer name of ``system``; templates only know ``system``
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


# Content part types every model takes; anything else needs the model to say it accepts it.
TEXT_PARTS = frozenset({"text", "refusal"})


def check_content_parts(messages: list[dict[str, Any]], accepted: frozenset[str]) -> None:
    """400 ``unsupported_content`` naming the first part the model cannot take. ``accepted``:
    the non-text part types the loaded model declares (``image_url`` for a vision model)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind in TEXT_PARTS or kind in accepted:
                continue
            raise ApiError(
                400,
                "unsupported_content",
                f"messages[{i}].content[{j}]: this model takes text only; a {kind!r} part "
                "cannot be given to it (it would be dropped and answered as if absent)",
                param=f"messages[{i}].content[{j}]",
            )


def _refuse_unsupported_chat_fields(body: dict[str, Any]) -> None:
    """Chat fields cortex cannot honour, refused when set (see the module docstring)."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        param = "functions" if body.get("functions") is not None else "function_call"
        raise _unsupported(
            f"{param}: the legacy functions API is not supported; send 'tools' (and "
            "'tool_choice') instead",
            param,
        )
    if body.get("web_search_options") is not None:
        raise _unsupported(
            "web_search_options: web search runs on OpenAI's servers; cortex models cannot "
            "search the web",
            "web_search_options",
        )
    if body.get("audio") is not None:
        raise _unsupported("audio output is not supported by cortex models", "audio")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported(
            f"modalities: cortex models answer text only (got {modalities!r})", "modalities"
        )


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None or body.get("tool_choice") == "none":
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise bad_request("'tools' must be a list of objects", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(
                f"tools[{i}] needs a 'function' with a 'name'", param=f"tools[{i}].function"
            )
    return tools or None


def _tool_call_format(
    body: dict[str, Any], tools: list[dict[str, Any]] | None
) -> ToolCallFormat | None:
    """What the harness must hold tool calls to: with ``tool_choice`` ``required`` (or
    ``any``) the answer is calls to any tool, with a named function calls to that one, and
    with ``auto`` a call the model starts follows its tool's schema when some tool is
    ``strict`` (OpenAI's structured outputs for function calling). None: nothing to hold."""
    choice = body.get("tool_choice", "auto")
    if tools is None:
        if choice not in ("auto", "none", None) and not body.get("tools"):
            raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    required = False
    chosen = tools
    if choice in ("required", "any"):
        required = True
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request(
                "'tool_choice' must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise bad_request(
                f"tool_choice names {name!r}, which is not in 'tools'", param="tool_choice"
            )
        required = True
    elif choice not in ("auto", None):
        raise bad_request(
            f"'tool_choice' must be 'none', 'auto', 'required' or a named function, got {choice!r}",
            param="tool_choice",
        )
    strict = [bool(t["function"].get("strict")) for t in chosen]
    if not required and not any(strict):
        return None
    schemas = []
    for tool, is_strict in zip(chosen, strict, strict=True):
        parameters = tool["function"].get("parameters")
        if parameters is None or not is_strict:
            parameters = {"type": "object"}
        if not isinstance(parameters, dict):
            raise bad_request("a tool's 'parameters' must be a JSON Schema object", param="tools")
        schemas.append(ToolSchema(tool["function"]["name"], json.dumps(parameters)))
    return ToolCallFormat(tuple(schemas), required=required)


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    _refuse_unsupported_chat_fields(body)
    options = _options(body)
    tools = _tools(body)
    tool_calls = _tool_call_format(body, tools)
    if tool_calls is not None:
        options = attrs.evolve(
            options, sampling=attrs.evolve(options.sampling, tool_calls=tool_calls)
        )
    return ChatRequest(options=options, messages=_messages(body), tools=tools)


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    options = _options(body, completion=True)
    if body.get("echo"):
        raise _unsupported("echo is not supported by this server", "echo")
    if body.get("suffix"):
        raise _unsupported("suffix is not supported by this server", "suffix")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return CompletionRequest(options=options, prompt_text=prompt, prompt_ids=None)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return CompletionRequest(options=options, prompt_text=None, prompt_ids=list(prompt))
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _unsupported("only one prompt per request is supported", "prompt")
    raise bad_request("'prompt' must be a string or a non-empty list of token ids", param="prompt")
