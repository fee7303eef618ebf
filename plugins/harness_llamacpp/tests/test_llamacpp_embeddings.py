"""``POST /v1/embeddings`` from GGUF embedding models: a registry serving a BERT GGUF, a decoder
(llama) embedding GGUF and a chat GGUF, a real ``neuron run`` process, the official ``openai``
SDK. The vectors are the ones llama-cpp-python's own ``Llama(embedding=True).embed`` computes for
the same file; a chat GGUF asked for embeddings and an embedding GGUF asked to chat are typed
400s. Then through a gateway: cold-loaded, routed and metered like chat."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet
from cortex.testing.registry import RunningRegistry, publish_repo, start_registry
from cortex.testing.servers import ProcessServer, python_program

pytest.importorskip("llama_cpp")

CHAT_REPO = "acme/tiny-GGUF"
BERT_REPO = "acme/tiny-bert-embed-GGUF"
LLAMA_REPO = "acme/tiny-llama-embed-GGUF"
CHAT = f"huggingface:{CHAT_REPO}"
EMBEDDERS = {"bert": f"huggingface:{BERT_REPO}", "llama": f"huggingface:{LLAMA_REPO}"}
NEURON_ENV = {
    "CORTEX_LLAMACPP_N_THREADS": "1",
    # llama-cpp-python's Llama (the reference) runs without flash attention
    "CORTEX_LLAMACPP_FLASH_ATTN": "off",
    "CORTEX_PLUGINS": "harness-llamacpp,source-huggingface",
}
TEXTS = ["the cat sings", "a dog runs far away from the house", "hello"]


@pytest.fixture(scope="module")
def repos(
    tiny_gguf_repo: Path, tiny_embedding_gguf_repo: Path, tiny_llama_embedding_gguf_repo: Path
) -> dict[str, Path]:
    return {
        CHAT_REPO: tiny_gguf_repo,
        BERT_REPO: tiny_embedding_gguf_repo,
        LLAMA_REPO: tiny_llama_embedding_gguf_repo,
    }


@pytest.fixture(scope="module")
def registry(
    repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningRegistry]:
    root = tmp_path_factory.mktemp("registry")
    for repo, folder in repos.items():
        publish_repo(root, repo, folder)
    with start_registry(root) as running:
        yield running


@pytest.fixture(scope="module")
def neuron(
    registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessServer]:
    config = tmp_path_factory.mktemp("neuron") / "neuron.toml"
    config.write_text(
        f"""
[sources.huggingface]
endpoint = "{registry.url}"
cache_dir = "{tmp_path_factory.mktemp("hf-cache")}"

[devices."cpu"]
memory_mb = 4096
"""
    )
    server = ProcessServer(
        python_program("cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0"),
        env=NEURON_ENV,
    )
    with server:
        for repo, quant in ((CHAT_REPO, "f16"), (BERT_REPO, None), (LLAMA_REPO, None)):
            body = {"model_id": repo} | ({"quant": quant} if quant else {})
            response = httpx.post(f"{server.url}/models/load", json=body, timeout=120)
            assert response.status_code == 200, response.text
        yield server


@pytest.fixture
def client(neuron: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)


def reference(path: Path, texts: list[str]) -> list[list[float]]:
    """llama-cpp-python's high-level API on the same file: ``Llama.embed(normalize=True)``."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, embedding=True, verbose=False)
    try:
        return llm.embed(texts, normalize=True)
    finally:
        llm.close()


def assert_close(a: list[float], b: list[float], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol


def gguf_of(folder: Path) -> Path:
    (path,) = folder.glob("*.gguf")
    return path


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_vectors_equal_llama_cpp_python(
    client: openai.OpenAI, repos: dict[str, Path], kind: str
) -> None:
    """Several inputs in one request (one llama_decode): each the vector llama-cpp-python
    computes, unit length, in order, with usage counting every input token."""
    model = EMBEDDERS[kind]
    result = client.embeddings.create(model=model, input=TEXTS)
    expected = reference(gguf_of(repos[model.split(":", 1)[1]]), TEXTS)
    assert [d.index for d in result.data] == [0, 1, 2]
    for got, want in zip(result.data, expected, strict=True):
        assert len(got.embedding) == 64
        assert_close(got.embedding, want)
        assert math.isclose(math.sqrt(sum(x * x for x in got.embedding)), 1.0, rel_tol=1e-6)
    assert result.model == model
    assert result.usage.prompt_tokens == result.usage.total_tokens > len(TEXTS)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_several_inputs_equal_each_alone(client: openai.OpenAI, kind: str) -> None:
    model = EMBEDDERS[kind]
    inputs = [f"{text} {i}" for i in range(30) for text in TEXTS[:2]]  # > one batch of tokens
    together = client.embeddings.create(model=model, input=inputs).data
    for i in (0, 1, 17, 59):
        alone = client.embeddings.create(model=model, input=inputs[i]).data[0].embedding
        assert_close(together[i].embedding, alone)


def test_base64_dimensions_and_token_ids(
    client: openai.OpenAI, neuron: ProcessServer, repos: dict[str, Path]
) -> None:
    model = EMBEDDERS["bert"]
    floats = client.embeddings.create(model=model, input="the cat sings").data[0].embedding
    raw = httpx.post(
        f"{neuron.url}/v1/embeddings",
        json={"model": model, "input": "the cat sings", "encoding_format": "base64"},
        timeout=30,
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert_close(list(struct.unpack(f"<{len(packed) // 4}f", packed)), floats, tol=1e-6)
    short = client.embeddings.create(model=model, input="the cat sings", dimensions=16)
    head = floats[:16]
    norm = math.sqrt(sum(x * x for x in head))
    assert_close(short.data[0].embedding, [x / norm for x in head])
    import llama_cpp

    vocab = llama_cpp.Llama(str(gguf_of(repos[BERT_REPO])), vocab_only=True, verbose=False)
    token_ids = vocab.tokenize(b"the cat sings", add_bos=True, special=True)
    by_ids = client.embeddings.create(model=model, input=[token_ids])
    assert_close(by_ids.data[0].embedding, floats)


def test_a_chat_gguf_refuses_embeddings(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=CHAT, input="x")
    assert refused.value.code == "unsupported_model"
    assert refused.value.body["param"] == "model"


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_an_embedding_gguf_refuses_chat_and_completions(
    client: openai.OpenAI, neuron: ProcessServer, kind: str
) -> None:
    model = EMBEDDERS[kind]
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/embeddings" in chat.value.message
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model=model, prompt="hi", max_tokens=4)
    assert "/v1/embeddings" in completion.value.message
    models = {m["id"]: m for m in httpx.get(f"{neuron.url}/models").json()["models"]}
    assert models[model]["capabilities"] == ["embeddings"]
    assert models[model]["context_length"] == 256
    assert "embeddings" not in models[CHAT]["capabilities"]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"input": " ".join(["word"] * 300)}, "context_length_exceeded", "input[0]"),
        ({"input": [[3, 10**6]]}, None, None),
        ({"input": "x", "dimensions": 65}, None, "dimensions"),
    ],
)
def test_bad_requests_are_typed_400s(
    neuron: ProcessServer, body: dict[str, object], code: str | None, param: str | None
) -> None:
    response = httpx.post(
        f"{neuron.url}/v1/embeddings", json={"model": EMBEDDERS["llama"], **body}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


# ---- through a gateway ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(tmp, start_registry(tmp / "repos"))
    try:
        for repo, folder in repos.items():
            publish_repo(fleet.registry.root, repo, folder)
        fleet.start_neurons(n1=1000)
        yield fleet
    finally:
        fleet.stop()


def test_through_the_gateway_cold_loaded_routed_and_metered(fleet: Fleet) -> None:
    gw = fleet.gateway(
        models=[
            ModelProfile(id=BERT_REPO, harness="llamacpp", memory_mb=100),
            ModelProfile(id=CHAT_REPO, harness="llamacpp", memory_mb=100, quant="F16"),
        ],
        aliases={"embed": BERT_REPO, "tiny": CHAT_REPO},
    )
    client = gw.client(timeout=120)
    result = client.embeddings.create(model="embed", input=TEXTS)
    assert len(result.data) == 3 and len(result.data[0].embedding) == 64
    assert result.model == "embed"
    assert gw.metric("cortex_cold_loads_total", outcome="ok") == 1
    direct = openai.OpenAI(
        base_url=f"{fleet.neuron_url('n1')}/v1", api_key="unused", max_retries=0
    ).embeddings.create(model=EMBEDDERS["bert"], input=TEXTS)
    assert [d.embedding for d in result.data] == [d.embedding for d in direct.data]
    gw.wait_for(lambda: gw.metric("cortex_prompt_tokens_total", model=EMBEDDERS["bert"]) > 0)
    tokens = gw.metric("cortex_prompt_tokens_total", model=EMBEDDERS["bert"])
    assert tokens == result.usage.prompt_tokens
    assert gw.metric("cortex_requests_total", route="/v1/embeddings", status="ok") == 1
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input="x")
    assert refused.value.code == "unsupported_model"
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "x"}])
    assert "/v1/embeddings" in str(chat.value)
