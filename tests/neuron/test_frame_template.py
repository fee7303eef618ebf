"""The per-token SSE frame template writes exactly the bytes the full JSON encoding writes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from cortex.neuron.framing import text_frame_encoder
from cortex.wire import sse

BASE = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "a/b"}


def chat_frame(text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    return sse.encode_data({**BASE, "choices": [choice]})


TRICKY = ["", "plain", 'a "quote"', "back\\slash", "new\nline\r\t", "é ü 中文", "🙂", "\u2028\x00"]


def test_template_matches_the_full_encoding_on_tricky_text() -> None:
    encode = text_frame_encoder(chat_frame)
    assert encode is not chat_frame
    for text in TRICKY:
        assert encode(text) == chat_frame(text)
        payload = json.loads(encode(text)[len(b"data: ") : -2])
        assert payload["choices"][0]["delta"]["content"] == text


@given(st.text())
def test_template_matches_the_full_encoding_on_any_text(text: str) -> None:
    assert text_frame_encoder(chat_frame)(text) == chat_frame(text)


def test_a_frame_that_holds_the_text_twice_is_not_templated() -> None:
    def twice(text: str) -> bytes:
        return sse.encode_data({"a": text, "b": text})

    assert text_frame_encoder(twice) is twice
