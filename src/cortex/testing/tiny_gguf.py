"""Tiny GGUF models for tests, written from the tiny transformers model with ``gguf.GGUFWriter``.

llama.cpp's own ``convert_hf_to_gguf.py`` refuses a tokenizer it does not know by hash, so the
file is written directly: architecture ``llama``, the hyper-parameters from ``config.json``, a
``gpt2`` BPE tokenizer (pre-tokenizer ``gpt-2``, the same regex as the HF ByteLevel
pre-tokenizer) with tokens, types and merges from ``tokenizer.json``, the chat template, and the
weights under llama.cpp's tensor names. The q and k projections are permuted the way the
converter does (llama.cpp's rope pairs adjacent dimensions, transformers' rotates halves), so the
GGUF computes the same function as the transformers model.

One source model can be written in several "quants" (``F32``, ``F16``, ``Q8_0``), which is how a
test publishes a GGUF repo with a choice of files.

Embedding GGUFs, as ``convert_hf_to_gguf.py`` writes them for sentence-transformers repos, carry
``{arch}.pooling_type``: :func:`write_gguf` writes the tiny llama with one (a decoder embedder,
like Qwen3-Embedding), and :func:`write_bert_gguf` writes the tiny BERT encoder of
:func:`cortex.testing.tiny_models.build_tiny_embedding_model` (architecture ``bert``,
``bert.attention.causal = false``, with the byte-level BPE vocabulary the way the converter
writes RoBERTa-style BPE encoders), which llama.cpp computes to within float rounding of
transformers. gguf, numpy and safetensors are imported inside
the functions: ``cortex.testing`` stays importable on a gateway-only install.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from cortex.testing.tiny_models import build_tiny_model

DEFAULT_QUANTS = ("F32", "F16")

_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers llama tensor (``model.layers.0.mlp.up_proj.weight``
    -> ``blk.0.ffn_up.weight``)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        layer, module, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module in _LAYER_TENSORS:
            return f"blk.{layer}.{_LAYER_TENSORS[module]}.{suffix}"
    raise ValueError(f"no GGUF name for tensor {hf_name!r}")


def _permute_for_rope(weights: Any, n_head: int) -> Any:
    """Reorder q/k rows from transformers' rotate-half layout to llama.cpp's interleaved one."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _read_tokenizer(model_dir: Path) -> tuple[list[str], list[int], list[str], dict[str, Any]]:
    """Tokens (ordered by id), token types, merges and the added-token table of tokenizer.json."""
    import gguf

    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        if text in added:
            special = added[text].get("special", False)
            types[token_id] = int(
                gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            )
        else:
            types[token_id] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, types, merges, added


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.exists():
        return json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    return None


def _special_id(model_dir: Path, key: str, added: dict[str, Any]) -> int | None:
    """``eos_token`` / ``bos_token`` from tokenizer_config.json resolved to an id."""
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.exists():
        return None
    value = json.loads(config_path.read_text(encoding="utf-8")).get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value and value in added:
        return int(added[value]["id"])
    return None


def _file_type(quant: str) -> tuple[Any, Any]:
    """(GGUF file type, tensor type) of ``quant``."""
    import gguf

    file_types = {
        "F32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        "F16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
        "Q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    }
    if quant.upper() not in file_types:
        raise ValueError(f"unsupported quant {quant!r}; expected one of {sorted(file_types)}")
    return file_types[quant.upper()]


def _pooling_type(pooling: str) -> Any:
    import gguf

    try:
        return gguf.PoolingType[pooling.upper()]
    except KeyError:
        names = ", ".join(p.name.lower() for p in gguf.PoolingType)
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {names}") from None


def _add_tensor(writer: Any, name: str, data: Any, tensor_type: Any) -> None:
    """``data`` (float32) as ``tensor_type``; 1-D tensors (norms, biases) stay F32."""
    import gguf
    import numpy as np

    if data.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif tensor_type == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)


def _add_bpe_vocab(writer: Any, model_dir: Path) -> dict[str, Any]:
    """The byte-level BPE vocabulary of ``tokenizer.json`` (llama.cpp's ``gpt2`` model with the
    ``gpt-2`` pre-tokenizer); returns the added-token table."""
    tokens, types, merges, added = _read_tokenizer(model_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    return added


def write_gguf(
    model_dir: str | Path, out_path: str | Path, quant: str = "F32", pooling: str | None = None
) -> Path:
    """Write the transformers llama model in ``model_dir`` as a GGUF file of type ``quant``
    (``F32``, ``F16`` or ``Q8_0``; norms stay F32 as llama.cpp expects). With ``pooling``
    (``mean``, ``cls``, ``last``, ``rank``) the file declares ``llama.pooling_type``, which
    makes it an embedding model (a reranker for ``rank``). Returns ``out_path``."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    model_dir, out = Path(model_dir), Path(out_path)
    file_type, tensor_type = _file_type(quant)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope_theta = float(
        (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 1e4)
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(int(file_type))
    if pooling is not None:
        writer.add_pooling_type(_pooling_type(pooling))

    added = _add_bpe_vocab(writer, model_dir)
    eos = _special_id(model_dir, "eos_token", added)
    if eos is None and config.get("eos_token_id") is not None:
        eos = int(config["eos_token_id"])
    if eos is not None:
        writer.add_eos_token_id(eos)
    bos = _special_id(model_dir, "bos_token", added)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(bos is not None)
    pad = _special_id(model_dir, "pad_token", added)
    if pad is not None:
        writer.add_pad_token_id(pad)
    template = _chat_template(model_dir)
    if template:
        writer.add_chat_template(template)

    for name, array in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        gguf_name = gguf_tensor_name(name)
        data = np.ascontiguousarray(array, dtype=np.float32)
        if name.endswith("q_proj.weight"):
            data = _permute_for_rope(data, n_head)
        elif name.endswith("k_proj.weight"):
            data = _permute_for_rope(data, n_head_kv)
        _add_tensor(writer, gguf_name, data, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_bert_gguf(
    model_dir: str | Path, out_path: str | Path, quant: str = "F32", pooling: str | None = "mean"
) -> Path:
    """Write the transformers BERT encoder in ``model_dir`` (``build_tiny_embedding_model``) as
    a GGUF file the way ``convert_hf_to_gguf.py`` converts a BERT-family embedding model:
    architecture ``bert``, non-causal attention, ``bert.pooling_type`` from ``pooling`` (none
    with ``None``: a plain encoder), tensors named through gguf-py's BERT tensor map (the pooler
    head dropped, as the converter does). Returns ``out_path``."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    model_dir, out = Path(model_dir), Path(out_path)
    file_type, tensor_type = _file_type(quant)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    n_layer = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "bert")
    writer.add_name(model_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_file_type(int(file_type))
    if pooling is not None:
        writer.add_pooling_type(_pooling_type(pooling))

    added = _add_bpe_vocab(writer, model_dir)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_add_bos_token(False)
    pad = _special_id(model_dir, "pad_token", added)
    if pad is not None:
        writer.add_pad_token_id(pad)

    for name, array in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        if name.startswith("pooler.") or name == "embeddings.position_ids":
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for BERT tensor {name!r}")
        # llama.cpp adds these to F32 activations, which its CPU add cannot do from F16: the
        # converter keeps them F32 in every file type
        kept = gguf_name.startswith(("position_embd.", "token_types."))
        data = np.ascontiguousarray(array, dtype=np.float32)
        _add_tensor(writer, gguf_name, data, gguf.GGMLQuantizationType.F32 if kept else tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def build_tiny_gguf_repo(
    out_dir: str | Path,
    quants: tuple[str, ...] = DEFAULT_QUANTS,
    seed: int = 0,
    stem: str = "tiny",
    model_dir: str | Path | None = None,
) -> Path:
    """A directory laid out like a GGUF repo on the hub: ``{stem}-{QUANT}.gguf`` per quant plus a
    README, written from the tiny llama model in ``model_dir`` (built in a temporary folder when
    not given, so ``out_dir`` holds only what a registry should publish)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        with tempfile.TemporaryDirectory(prefix="tiny-hf-") as scratch:
            source = build_tiny_model(Path(scratch) / "llama", arch="llama", seed=seed)
            for quant in quants:
                write_gguf(source, out / f"{stem}-{quant.upper()}.gguf", quant)
    else:
        for quant in quants:
            write_gguf(model_dir, out / f"{stem}-{quant.upper()}.gguf", quant)
    (out / "README.md").write_text(
        f"# {stem}\n\nA tiny random llama model for tests, in GGUF ({', '.join(quants)}).\n",
        encoding="utf-8",
    )
    return out


EMBEDDING_KINDS = ("bert", "llama")


def build_tiny_embedding_gguf_repo(
    out_dir: str | Path,
    kind: str = "bert",
    quants: tuple[str, ...] = ("F32",),
    seed: int = 0,
    stem: str | None = None,
    model_dir: str | Path | None = None,
    pooling: str | None = "mean",
) -> Path:
    """A GGUF repo of an embedding model: ``{stem}-{QUANT}.gguf`` per quant plus a README.
    ``kind="bert"``: the tiny BERT encoder (``build_tiny_embedding_model``, or ``model_dir``);
    ``kind="llama"``: the tiny llama (``build_tiny_model``, or ``model_dir``) declaring
    ``pooling`` (a decoder embedder)."""
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"unknown embedding kind {kind!r}; expected one of {EMBEDDING_KINDS}")
    from cortex.testing.tiny_models import build_tiny_embedding_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"tiny-{kind}-embed"
    write = write_bert_gguf if kind == "bert" else write_gguf
    with tempfile.TemporaryDirectory(prefix="tiny-hf-") as scratch:
        source = Path(model_dir) if model_dir is not None else None
        if source is None and kind == "bert":
            source = build_tiny_embedding_model(Path(scratch) / "bert", seed=seed)
        elif source is None:
            source = build_tiny_model(Path(scratch) / "llama", arch="llama", seed=seed)
        for quant in quants:
            write(source, out / f"{stem}-{quant.upper()}.gguf", quant, pooling=pooling)
    (out / "README.md").write_text(
        f"# {stem}\n\nA tiny random {kind} embedding model for tests "
        f"(pooling {pooling or 'none'}), in GGUF ({', '.join(quants)}).\n",
        encoding="utf-8",
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m cortex.testing.tiny_gguf OUT_DIR [--quants F16,Q8_0] [--embedding bert]``: a
    GGUF repo to publish with ``cortex registry serve`` (what docs/harnesses.md's walkthrough
    uses); ``--embedding bert|llama`` writes an embedding model instead of the chat model."""
    parser = argparse.ArgumentParser(prog="python -m cortex.testing.tiny_gguf")
    parser.add_argument("out_dir", type=Path, help="folder to write the repo into")
    parser.add_argument("--quants", default=",".join(DEFAULT_QUANTS), help="F32, F16, Q8_0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--embedding", choices=EMBEDDING_KINDS, help="an embedding model (mean pooling)"
    )
    args = parser.parse_args(argv)
    quants = tuple(q.strip() for q in args.quants.split(",") if q.strip())
    if args.embedding:
        out = build_tiny_embedding_gguf_repo(
            args.out_dir, kind=args.embedding, quants=quants, seed=args.seed
        )
    else:
        out = build_tiny_gguf_repo(args.out_dir, quants=quants, seed=args.seed)
    for path in sorted(out.iterdir()):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
