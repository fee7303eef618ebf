"""Embedding GGUFs through the harness: which files load in embedding mode (the rule in
``cortex_harness_llamacpp.embedding``), and the vectors, compared against llama-cpp-python's own
``Llama(embedding=True).embed`` on the same file and, for the BERT GGUF, against transformers on
the repo it was written from (what the torch harness serves)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
from cortex_harness_llamacpp.embedding import LlamaCppEmbeddingModel, pack
from cortex_harness_llamacpp.harness import LlamaCppHarness
from cortex_harness_llamacpp.model import LlamaCppModel

from cortex.devices import cpu_device
from cortex.harness import (
    EMBEDDINGS,
    EmbeddingModel,
    HarnessError,
    LoadedModel,
    LoadOptions,
    PromptError,
    SamplingParams,
)
from cortex.testing.tiny_gguf import write_bert_gguf, write_gguf

pytest.importorskip("llama_cpp")

# Flash attention off: llama-cpp-python's Llama (the reference) runs without it.
DEFAULTS = {"n_threads": 1, "flash_attn": "off"}
TEXTS = ["the cat sings", "a dog runs far away from the house", "hello"]


def load(repo: Path, quant: str | None = None, **extra: object) -> LoadedModel:
    context = extra.pop("context_length", None)
    options = LoadOptions(quant=quant, context_length=context, extra={**DEFAULTS, **extra})
    return LlamaCppHarness().load(repo, cpu_device(), options)


def only_gguf(repo: Path) -> Path:
    (path,) = repo.glob("*.gguf")
    return path


def reference(path: Path, texts: list[str], normalize: bool = True, **kwargs: object) -> list:
    """What llama-cpp-python's high-level API computes for the same file."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=256, n_threads=1, embedding=True, verbose=False, **kwargs
    )
    try:
        return llm.embed(texts, normalize=normalize)
    finally:
        llm.close()


def assert_close(got: list[list[float]], want: list[list[float]], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert len(a) == len(b)
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol


def embed_texts(model: LoadedModel, texts: list[str]) -> list[list[float]]:
    assert isinstance(model, EmbeddingModel)
    return model.embed([model.tokenize(t) for t in texts])


@pytest.fixture(params=["bert", "llama"])
def embedder_repo(
    request: pytest.FixtureRequest,
    tiny_embedding_gguf_repo: Path,
    tiny_llama_embedding_gguf_repo: Path,
) -> Path:
    return tiny_embedding_gguf_repo if request.param == "bert" else tiny_llama_embedding_gguf_repo


@pytest.fixture
def embedder(embedder_repo: Path):
    model = load(embedder_repo)
    yield model
    model.unload()


# ---- which GGUF is an embedding model -----------------------------------------------------


def test_an_embedding_gguf_loads_in_embedding_mode(embedder: LoadedModel) -> None:
    assert isinstance(embedder, LlamaCppEmbeddingModel)
    assert isinstance(embedder, EmbeddingModel)
    assert embedder.capabilities == frozenset({EMBEDDINGS})
    assert embedder.dimensions == 64
    assert embedder.pooling == "mean"
    assert embedder.context_length == 256
    # a whole context fits one micro-batch, and as many sequences as llama.cpp allows
    assert embedder.n_batch == 256 and embedder.n_seq_max == 256
    assert embedder.memory_bytes() > 0


def test_memory_counts_the_buffers_llama_cpp_allocates(
    embedder_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The output buffer (logits and embedding rows for every token of a batch) is what
    llama.cpp logs it allocated; the LM head's logits of a decoder embedder fit in the compute
    buffer it logs, and an encoder has none."""
    caplog.set_level(logging.DEBUG, logger="cortex.harness.llamacpp")
    model = load(embedder_repo)
    try:
        assert isinstance(model, LlamaCppEmbeddingModel)
        output = re.search(r"output buffer size =\s+([\d.]+) MiB", caplog.text)
        compute = re.search(r"compute buffer size =\s+([\d.]+) MiB", caplog.text)
        assert output is not None and compute is not None
        assert abs(model.output_bytes / 2**20 - float(output.group(1))) < 0.01
        if model._memory is None:  # the encoder
            assert model.logits_bytes == 0
        else:
            assert 0 < model.logits_bytes <= float(compute.group(1)) * 2**20
        assert model.memory_bytes() > model.output_bytes + model.logits_bytes
    finally:
        model.unload()


def test_a_chat_gguf_still_loads_as_a_generation_model(tiny_gguf_repo: Path) -> None:
    model = load(tiny_gguf_repo, "F16")
    try:
        assert isinstance(model, LlamaCppModel)
        assert EMBEDDINGS not in model.capabilities
    finally:
        model.unload()


def test_an_encoder_without_pooling_metadata_is_mean_pooled(
    tiny_embedding_dir: Path, tmp_path: Path
) -> None:
    """A BERT GGUF converted from a repo without sentence-transformers files has no
    ``bert.pooling_type`` (llama.cpp would run it with pooling none): it is still an encoder,
    served with mean pooling, the same vectors as the file that declares it."""
    write_bert_gguf(tiny_embedding_dir, tmp_path / "plain" / "plain-F32.gguf", pooling=None)
    write_bert_gguf(tiny_embedding_dir, tmp_path / "mean" / "mean-F32.gguf", pooling="mean")
    plain, declared = load(tmp_path / "plain"), load(tmp_path / "mean")
    try:
        assert isinstance(plain, LlamaCppEmbeddingModel) and plain.pooling == "mean"
        assert_close(embed_texts(plain, TEXTS), embed_texts(declared, TEXTS), tol=1e-7)
    finally:
        plain.unload()
        declared.unload()


@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_the_declared_pooling_is_used(tiny_llama_dir: Path, tmp_path: Path, pooling: str) -> None:
    path = write_gguf(tiny_llama_dir, tmp_path / f"{pooling}-F32.gguf", pooling=pooling)
    model = load(tmp_path)
    try:
        assert isinstance(model, LlamaCppEmbeddingModel) and model.pooling == pooling
        assert_close(embed_texts(model, TEXTS), reference(path, TEXTS))
    finally:
        model.unload()


def test_a_reranker_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    write_gguf(tiny_llama_dir, tmp_path / "rerank-F32.gguf", pooling="rank")
    with pytest.raises(HarnessError, match=r"reranker \(llama\.pooling_type rank\)"):
        load(tmp_path)


def test_the_pooling_option_serves_any_gguf_as_an_embedding_model(tiny_gguf_repo: Path) -> None:
    """``pooling = "last"`` on a chat GGUF: llama-server's ``--embedding --pooling last``."""
    import llama_cpp

    model = load(tiny_gguf_repo, "F32", pooling="last")
    try:
        assert isinstance(model, LlamaCppEmbeddingModel) and model.pooling == "last"
        want = reference(
            tiny_gguf_repo / "tiny-F32.gguf", TEXTS, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST
        )
        assert_close(embed_texts(model, TEXTS), want)
    finally:
        model.unload()


def test_a_context_beyond_the_trained_one_is_refused(embedder_repo: Path) -> None:
    with pytest.raises(HarnessError, match=r"context_length 512 exceeds .* \(256 tokens\)"):
        load(embedder_repo, context_length=512)


# ---- vectors -------------------------------------------------------------------------------


def test_vectors_equal_llama_cpp_python(embedder: LoadedModel, embedder_repo: Path) -> None:
    got = embed_texts(embedder, TEXTS)
    assert_close(got, reference(only_gguf(embedder_repo), TEXTS))
    for vector in got:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-9)


def test_without_normalisation_the_raw_pooled_vectors(embedder_repo: Path) -> None:
    model = load(embedder_repo, normalize_embeddings=False)
    try:
        got = embed_texts(model, TEXTS)
        assert_close(got, reference(only_gguf(embedder_repo), TEXTS, normalize=False), tol=1e-4)
        assert any(abs(math.sqrt(sum(x * x for x in v)) - 1.0) > 1e-3 for v in got)
    finally:
        model.unload()


def test_an_f16_bert_gguf_loads_and_embeds_close_to_f32(
    tiny_embedding_dir: Path, tiny_embedding_gguf_repo: Path, tmp_path: Path
) -> None:
    """Position and token-type embeddings stay F32 in an F16 file (as the converter keeps
    them): llama.cpp's CPU add cannot take them in F16."""
    write_bert_gguf(tiny_embedding_dir, tmp_path / "tiny-bert-embed-F16.gguf", "F16")
    half, full = load(tmp_path), load(tiny_embedding_gguf_repo)
    try:
        assert_close(embed_texts(half, TEXTS), embed_texts(full, TEXTS), tol=5e-3)
    finally:
        half.unload()
        full.unload()


def test_the_bert_gguf_gives_the_vectors_transformers_gives_its_source(
    tiny_embedding_gguf_repo: Path, tiny_embedding_dir: Path
) -> None:
    """The GGUF written from the sentence-transformers repo embeds like the repo itself (mean
    pooling, normalised), which is what the torch harness serves for it."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_embedding_dir, local_files_only=True)
    source = AutoModel.from_pretrained(tiny_embedding_dir, local_files_only=True).eval()
    model = load(tiny_embedding_gguf_repo)
    try:
        for text, got in zip(TEXTS, embed_texts(model, TEXTS), strict=True):
            ids = tokenizer.encode(text, add_special_tokens=True)
            assert model.tokenize(text) == ids
            with torch.inference_mode():
                hidden = source(input_ids=torch.tensor([ids])).last_hidden_state[0]
            want = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist()
            assert_close([got], [want], tol=1e-4)
    finally:
        model.unload()


def test_many_inputs_are_packed_into_few_batches_and_each_is_as_alone(
    embedder: LoadedModel,
) -> None:
    """More tokens than one batch holds: several decodes, several sequences each; every vector
    equals the one its input gets alone (and the KV cache is empty afterwards)."""
    assert isinstance(embedder, LlamaCppEmbeddingModel)
    sentence = "the quick red bird sings near the old river while a small dog runs"
    words = sentence.split(" ")
    inputs = [embedder.tokenize(" ".join(words[: 3 + i % 10])) for i in range(60)]
    assert sum(len(ids) for ids in inputs) > embedder.n_batch
    before = embedder.batches
    together = embedder.embed(inputs)
    batches = embedder.batches - before
    assert 1 < batches < len(inputs)
    memory = embedder._memory  # None for the encoder: it keeps no KV cache
    if memory is not None:
        for seq in range(embedder.n_seq_max):
            assert embedder._lib.llama_memory_seq_pos_max(memory, seq) == -1
    alone = [embedder.embed([ids])[0] for ids in inputs[:12]]
    assert_close(together[:12], alone)


def test_pack_keeps_order_and_bounds() -> None:
    inputs = [[1] * n for n in (5, 4, 3, 8, 1, 1, 1)]
    groups = pack(inputs, n_batch=8, n_seq_max=2)
    assert [[len(i) for i in g] for g in groups] == [[5], [4, 3], [8], [1, 1], [1]]
    assert [i for g in groups for i in g] == inputs


# ---- what an embedding model refuses --------------------------------------------------------


def test_chat_and_generation_are_refused_naming_the_endpoint(embedder: LoadedModel) -> None:
    with pytest.raises(PromptError, match="/v1/embeddings"):
        embedder.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(PromptError, match="/v1/embeddings"):
        embedder.start([1, 2, 3], SamplingParams())


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([[3, 10**6]], r"input\[0\] has token id 1000000, outside the vocabulary"),
        ([[3], []], r"input\[1\] has no tokens"),
        ([[3] * 257], r"input\[0\] has 257 tokens; .* at most 256"),
    ],
)
def test_bad_inputs_are_prompt_errors(
    embedder: LoadedModel, inputs: list[list[int]], message: str
) -> None:
    assert isinstance(embedder, EmbeddingModel)
    with pytest.raises(PromptError, match=message):
        embedder.embed(inputs)


def test_unload_frees_and_later_calls_fail(embedder_repo: Path) -> None:
    model = load(embedder_repo)
    assert isinstance(model, LlamaCppEmbeddingModel)
    model.unload()
    assert model.memory_bytes() == 0
    with pytest.raises(HarnessError, match="unloaded"):
        model.embed([[3]])
    model.unload()  # twice is fine
