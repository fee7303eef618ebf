"""Random Llama models of a chosen size, for load tests and the cold-start benchmark.

The tiny models (:mod:`cortex.testing.tiny_models`) are ~0.5 MB: too small to show what a load
does with memory. These have the same tokenizer and chat template, and as many layers of a
fixed width as it takes to reach ``target_bytes`` of weights, stored at ``dtype`` and split into
shards of at most ``shard_bytes`` (one file when None). Building one writes the weights once
(no initialiser runs: random normal values straight into the tensors), ~1-2 s per GB.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HIDDEN = 1024
INTERMEDIATE = 4096
HEADS = 16
KV_HEADS = 4


def layer_params(hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> int:
    kv = hidden * KV_HEADS // HEADS
    attention = 2 * hidden * hidden + 2 * hidden * kv
    return attention + 3 * hidden * intermediate + 2 * hidden


def build_sized_model(
    out_dir: str | Path,
    target_bytes: int,
    dtype: str = "float32",
    shard_bytes: int | None = None,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """A random Llama model with about ``target_bytes`` of weights at ``dtype`` in ``out_dir``.

    ``tokenizer_dir``: a saved tiny model to take the tokenizer from (built when None)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cortex.testing.tiny_models import EOS_TOKEN, PAD_TOKEN, train_tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        train_tiny_tokenizer(out)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    element = torch.finfo(getattr(torch, dtype)).bits // 8
    hidden, intermediate = HIDDEN, INTERMEDIATE
    while layer_params(hidden, intermediate) * element > max(target_bytes, 1) and hidden > 64:
        hidden, intermediate = hidden // 2, intermediate // 2  # small targets: narrower layers
    per_layer = layer_params(hidden, intermediate) * element
    embeddings = 2 * len(tokenizer) * hidden * element
    layers = max(1, round((target_bytes - embeddings) / per_layer))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=HEADS if hidden >= HEADS * 16 else 4,
        num_key_value_heads=KV_HEADS if hidden >= HEADS * 16 else 2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    shard = shard_bytes or 1 << 40
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    return out
