"""Tiny random transformers models for tests: a trained BPE tokenizer and a 2-layer model.

Tests must not download anything, and they must exercise the same code paths a real model takes:
a real BPE tokenizer (with a word-rich vocabulary so streamed text arrives in many small chunks,
plus multi-byte UTF-8 so incremental detokenisation is tested), a real ChatML chat template that
also renders ``tools``, and a real ``save_pretrained`` directory (``config.json``, safetensors,
``tokenizer.json``, ``chat_template.jinja``) that can be published to a registry. Building one
takes about a second; :func:`tiny_model_dir` caches built models per process.

torch, transformers and tokenizers are imported inside the functions, so importing this module is
cheap (``cortex.testing`` must stay importable on a gateway-only install).
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# ChatML, rendering ``tools`` the way Qwen2.5-style templates do (a system block that lists the
# tool signatures and asks for <tool_call> JSON), assistant tool calls and ``tool`` results.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}\n"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- endif %}\n"
    "{{- '# Tools\\n\\nYou may call one or more functions. "
    "Function signatures are within <tools></tools>:\\n<tools>' }}\n"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}\n"
    "{{- '\\n</tools>\\n\\nFor each call, return a JSON object within "
    "<tool_call></tool_call> tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}\n"
    "{%- elif messages[0]['role'] == 'system' %}\n"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'system' %}\n"
    "{%- if not loop.first %}"
    "{{- '<|im_start|>system\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- elif message['role'] == 'assistant' %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}\n"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}\n"
    "{%- for call in message['tool_calls'] %}\n"
    "{%- set fn = call['function'] if call['function'] is defined else call %}\n"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}\n"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}"
    "{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}\n"
    "{{- '}\\n</tool_call>' }}\n"
    "{%- endfor %}\n"
    "{%- endif %}\n"
    "{{- '<|im_end|>\\n' }}\n"
    "{%- elif message['role'] == 'tool' %}\n"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] "
    "+ '\\n</tool_response><|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

_WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the a an one two three red green blue small large quick slow bright dark old new cold "
    "warm cat dog bird fish horse river mountain city forest garden house window door table "
    "book letter story song music light water fire stone cloud rain snow wind sun moon star "
    "sky road bridge train ship market school teacher student friend family child mother "
    "father doctor runs walks jumps sings reads writes builds opens closes finds keeps takes "
    "gives makes sees hears knows thinks wants likes loves helps tells asks answers calls "
    "moves carries brings and or but because when while after before under over near behind "
    "between with without from into through across around every many some few all no this "
    "that these those model token server client request answer stream cache memory device "
    "queue worker engine weather tool function result value number name time today tomorrow "
    "morning evening night café naïve über straße señor jalapeño crème brûlée smörgåsbord "
    "déjà vu 東京 北京 日本語 中文 한국어 Ελληνικά русский "
    "שלום مرحبا 🙂 🚀 ✨ hello world yes please "
    "thanks sorry json python code data list text word line file path key error status ok"
).split()

_PUNCTUATION = (".", ".", ".", "!", "?", ",")


def _corpus(sentences: int = 600, seed: int = 0) -> list[str]:
    """A few hundred sentences from the word list (deterministic), plus digits and JSON bits so
    tool-call-like output and numbers tokenize into sensible pieces."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(_PUNCTUATION))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14")
    lines.append('{"name": "get_weather", "arguments": {"city": "Paris"}} <tool_call> </tool_call>')
    lines.append("system user assistant tool <tools> </tools> <tool_response> </tool_response>")
    return lines


def train_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 800) -> Path:
    """Train a byte-level BPE tokenizer with ChatML specials and save it as a
    ``PreTrainedTokenizerFast`` (``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja``) into ``out_dir``. Returns ``out_dir``.

    ``tokenizer.json`` is the standard tokenizers format (Engineer E's GGUF writer reads its
    vocabulary and merges), so nothing custom goes into it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    context_length: int = 256,
    shape: dict[str, int] | None = None,
) -> Path:
    """Save a random 2-layer ``arch`` model ("llama" or "qwen2") plus the tiny tokenizer into
    ``out_dir`` with ``save_pretrained`` (a few hundred KB, float32 safetensors). Returns
    ``out_dir``. The same seed gives the same weights, so greedy output is reproducible.
    ``shape`` overrides config sizes (vLLM's CPU attention needs a head size of at least 32:
    ``{"num_attention_heads": 2, "num_key_value_heads": 1}`` at hidden 64)."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    out = Path(out_dir)
    train_tiny_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": context_length,
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        "bos_token_id": None,
        "tie_word_embeddings": False,
        **(shape or {}),
    }
    if arch == "llama":
        config, model_cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, model_cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    model = model_cls(config)
    # Random init gives near-uniform logits; a larger spread makes greedy output less ambiguous
    # (no near-ties between tokens), so parity checks compare real decisions, not noise.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_embedding_model(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random BERT encoder laid out as a sentence-transformers repo (``modules.json``
    with Transformer, mean Pooling and Normalize, ``1_Pooling/config.json``) with the tiny
    tokenizer: what the torch harness serves on ``/v1/embeddings``."""
    import json

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = Path(out_dir)
    train_tiny_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    return out


_CACHE: dict[tuple[str, int], Path] = {}


def tiny_model_dir(base: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """``build_tiny_model`` into ``base/<arch>-<seed>`` once per process (later calls reuse it)."""
    key = (arch, seed)
    cached = _CACHE.get(key)
    if cached is not None and (cached / "config.json").exists():
        return cached
    out = build_tiny_model(Path(base) / f"{arch}-{seed}", arch=arch, seed=seed)
    _CACHE[key] = out
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m cortex.testing.tiny_models OUT_DIR [--arch llama|qwen2] [--seed N]``: write a
    tiny model repo (for walkthroughs and smoke tests of a neuron without a download)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cortex.testing.tiny_models")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"wrote a tiny {args.arch} model to {out}")


if __name__ == "__main__":
    main()
