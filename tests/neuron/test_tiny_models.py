"""The tiny test models: small, real, loadable, with a chat template that renders tools."""

from __future__ import annotations

import json
from pathlib import Path


def test_tiny_llama_is_small_and_complete(tiny_llama_dir: Path) -> None:
    names = {p.name for p in tiny_llama_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert (tiny_llama_dir / "model.safetensors").stat().st_size < 2_000_000
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2
    assert config["max_position_embeddings"] == 256


def test_tokenizer_is_word_rich_and_renders_tools(tiny_qwen2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir, local_files_only=True)
    assert 500 <= len(tokenizer) <= 1000
    # whole words are single tokens, so streamed text arrives in many small chunks
    assert len(tokenizer.tokenize(" the quick cat runs")) == 4
    text = "café 東京 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '"name": "get_weather"' in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
