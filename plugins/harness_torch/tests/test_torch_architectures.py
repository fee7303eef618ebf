"""Batching is not a Llama special case: tiny random models of other architectures (sliding
windows, per-layer mask types, different attention code) go through the batched path, pass its
load-time check, and give ``generate()``'s tokens alone while batched with others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cortex_harness_torch.batched import BatchedTorchModel, serve_model

from cortex.harness import LoadOptions, SamplingParams
from cortex.neuron.scheduler import Scheduler
from cortex.testing.batching import collected, drive, sequence

COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ARCHITECTURES = {
    "qwen3": {"head_dim": 16},  # q/k norms
    "mistral": {"sliding_window": 8},  # one windowed mask
    "gemma3_text": {"head_dim": 16, "sliding_window": 8},  # a mask per layer type
    "phi3": {},  # fused qkv
    "gpt2": None,  # another attention implementation entirely
}


def tiny(arch: str, extra: dict[str, Any] | None, vocab: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if extra is None:
        config = AutoConfig.for_model(
            arch,
            vocab_size=vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        config = AutoConfig.for_model(arch, vocab_size=vocab, **COMMON, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a wide spread: greedy decisions, not near ties
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_batches_and_matches_generate(arch: str, tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    model = tiny(arch, ARCHITECTURES[arch], len(tokenizer))
    served = serve_model(model, tokenizer, torch.device("cpu"), 512, LoadOptions(max_batch=4))
    assert isinstance(served, BatchedTorchModel), "the load-time check refused batching"
    texts = ["the cat", "a long story about the river and the old bridge in the city", "red"]
    prompts = [tokenizer.encode(t) for t in texts]
    greedy = SamplingParams(temperature=0)
    seqs = [sequence(served, p, 24, greedy) for p in prompts]
    # a budget of 8 tokens an iteration: the long prompt is prefilled in chunks beside decodes
    drive(Scheduler(max_batch_tokens=8), {0: seqs[:2], 3: seqs[2:]})
    for seq, prompt in zip(seqs, prompts, strict=True):
        ids = torch.tensor([prompt])
        reference = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        got = collected(seq)
        assert got.error is None
        assert got.tokens == reference[: len(got.tokens)]


def test_an_architecture_the_batched_path_cannot_drive_is_served_one_at_a_time(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """BLOOM (ALiBi attention, its own cache layout) fails the load-time check: the model is
    served one sequence at a time, which the scheduler steps one by one, still correctly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cortex.harness import is_batched

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    config = AutoConfig.for_model(
        "bloom",
        vocab_size=len(tokenizer),
        hidden_size=64,
        n_layer=2,
        n_head=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with caplog.at_level("WARNING"):
        served = serve_model(model, tokenizer, torch.device("cpu"), 256, LoadOptions())
    assert not is_batched(served)
    assert "serving one sequence at a time" in caplog.text
    prompts = [tokenizer.encode(t) for t in ("the cat", "a story about the river")]
    seqs = [sequence(served, p, 12, SamplingParams(temperature=0)) for p in prompts]
    drive(Scheduler(), {0: seqs})
    for seq, prompt in zip(seqs, prompts, strict=True):
        ids = torch.tensor([prompt])
        reference = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert collected(seq).tokens == reference[: len(collected(seq).tokens)]
