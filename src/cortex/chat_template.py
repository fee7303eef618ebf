"""Rendering OpenAI-style messages into prompt text with a Hugging Face tokenizer's chat template.

Shared by the harnesses that hold a transformers tokenizer (torch, vLLM), so a chat request
becomes the same prompt whichever of them serves it.

Templates in the wild expect plain string contents and tool-call arguments as objects; clients
send content parts and JSON-string arguments. :func:`normalise_messages` bridges the two once,
here, so each template sees what it was written for.

A tokenizer without a chat template gets :data:`FALLBACK_CHAT_TEMPLATE` (ChatML, the most common
format, with tools listed in a system block): it lets base models answer chat requests instead
of failing, and it is documented in docs/harnesses.md so nobody is surprised by it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from cortex.harness import PromptError

FALLBACK_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\nYou can call these tools; answer with "
    '<tool_call>{\\"name\\": ..., \\"arguments\\": {...}}</tool_call>:\\n\' }}'
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '<tool_call>' + {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson + '</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def content_text(content: Any) -> str:
    """OpenAI content is a string, null, or a list of parts; templates want a string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PromptError(f"content part of type {kind!r} is not supported by this model")
        return "".join(texts)
    raise PromptError(f"message content must be a string or a list of parts, not {content!r}")


def _normalise_tool_call(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise PromptError("each tool call needs a 'function' object with 'name' and 'arguments'")
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        # unparseable arguments stay as the client sent them
        with contextlib.suppress(ValueError):
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        if function["arguments"] is not arguments:
            _refuse_lone_surrogates(arguments, function["arguments"])
    return {**call, "function": function}


def _refuse_lone_surrogates(arguments: str, decoded: Any) -> None:
    """A :class:`PromptError` (the client's 400) for arguments whose JSON escapes decode to
    half a surrogate pair.

    Why here: request bodies are checked for lone surrogates where they are parsed
    (``cortex.wire.http``), but tool-call arguments are JSON *inside* a JSON string
    (``"{\\"city\\": \\"\\ud800\\"}"``, what a client's ``json.dumps`` writes for such a
    value), so only decoding them here makes the surrogate; no tokenizer can encode it, and
    it was a 500 from the harness."""
    if "\\u" not in arguments:
        return
    try:
        json.dumps(decoded, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(
            "tool call arguments hold a lone surrogate (a \\ud800-\\udfff escape without its "
            "pair): not valid Unicode"
        ) from None


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """String contents, tool-call arguments as objects; everything else passes through."""
    out = []
    for message in messages:
        item = dict(message)
        item["content"] = content_text(message.get("content"))
        if message.get("tool_calls"):
            item["tool_calls"] = [_normalise_tool_call(c) for c in message["tool_calls"]]
        out.append(item)
    return out


def render_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> str:
    """The prompt text for a chat request, ending with the assistant's generation prompt."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            normalise_messages(messages),
            tools=tools or None,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except PromptError:
        raise
    except Exception as exc:  # jinja TemplateError, raise_exception() in templates, bad keys
        raise PromptError(f"the model's chat template rejected the messages: {exc}") from None
    if not isinstance(text, str):
        raise PromptError("the chat template did not render text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Bodies are checked where they are parsed; this catches what a template made of them
        # (a surrogate decoded from JSON text inside a field), for every harness, before a
        # tokenizer fails on it with an error that says nothing to the client.
        raise PromptError("the rendered prompt holds a lone surrogate: not valid Unicode") from None
    return text


# Text the neuron parses out of an answer (tool-call blocks, reasoning): a tokenizer may hold
# these as *special* tokens, which decoding with ``skip_special_tokens`` would drop, so the
# answer would lose its markers and a tool call would come back as plain text.
ANSWER_MARKERS = ("<tool_call>", "</tool_call>", "<think>", "</think>")


class AnswerDecoder:
    """Token ids to text for a Hugging Face tokenizer: special tokens dropped, except the
    answer markers (:data:`ANSWER_MARKERS`) that this tokenizer holds as special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special = {int(i) for i, token in added.items() if getattr(token, "special", False)}
        special.update(int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ())
        #: marker text -> token id, for the markers held as special tokens
        self.special_markers: dict[str, int] = {
            str(token.content): int(i)
            for i, token in added.items()
            if int(i) in special and getattr(token, "content", None) in ANSWER_MARKERS
        }
        self._kept = frozenset(self.special_markers.values())
        self._dropped = frozenset(special - self._kept)

    def decode(self, token_ids: list[int]) -> str:
        if self._kept and not self._kept.isdisjoint(token_ids):
            kept = [t for t in token_ids if t not in self._dropped]
            return str(self._tokenizer.decode(kept, skip_special_tokens=False))
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))
