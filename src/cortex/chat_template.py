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
    return {**call, "function": function}


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
    return text
