"""Rendering chat messages with the tokenizer's chat template: the shared implementation in
:mod:`cortex.chat_template` (the vLLM harness renders with the same code)."""

from __future__ import annotations

from cortex.chat_template import (
    FALLBACK_CHAT_TEMPLATE,
    content_text,
    normalise_messages,
    render_prompt,
)

__all__ = ["FALLBACK_CHAT_TEMPLATE", "content_text", "normalise_messages", "render_prompt"]
