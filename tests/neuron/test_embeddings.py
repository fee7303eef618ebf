"""``POST /v1/embeddings`` on a real neuron with the official ``openai`` SDK: a
sentence-transformers repo (tiny random BERT, mean pooling, normalised) fetched from the local
registry gives the vectors transformers itself computes for it, in float and base64, shortened
by ``dimensions``; malformed requests and the wrong kind of model are typed 400s."""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path

import pytest

from tests.neuron.conftest import LiveNeuron

EMBEDDER = "huggingface:acme/tiny-embedder"
LLAMA = "huggingface:acme/tiny-llama"
TEXTS = ["the cat sings", "a dog runs far away from the house", "hello"]


@pytest.fixture(scope="module")
def loaded(neuron: LiveNeuron) -> LiveNeuron:
    neuron.load("acme/tiny-embedder")
    neuron.load("acme/tiny-llama")
    return neuron


def reference_vectors(repo: Path, texts: list[str]) -> list[list[float]]:
    """What sentence-transformers computes for this layout: every text alone through
    AutoModel, mean of its token states, unit length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=True)
    model = AutoModel.from_pretrained(repo, local_files_only=True).eval()
    vectors = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=True)])
        with torch.inference_mode():
            hidden = model(input_ids=ids).last_hidden_state[0]
        vectors.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist())
    return vectors


def assert_close(a: list[float], b: list[float], tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol


def test_vectors_match_transformers_for_a_padded_batch(
    loaded: LiveNeuron, tiny_embedding_dir: Path
) -> None:
    """Texts of different lengths in one request (one padded forward pass) each get the vector
    they would get alone."""
    result = loaded.openai().embeddings.create(model=EMBEDDER, input=TEXTS)
    expected = reference_vectors(tiny_embedding_dir, TEXTS)
    assert [d.index for d in result.data] == [0, 1, 2]
    for got, want in zip(result.data, expected, strict=True):
        assert_close(got.embedding, want)
        assert math.isclose(math.sqrt(sum(x * x for x in got.embedding)), 1.0, rel_tol=1e-5)
    assert result.model == EMBEDDER
    assert result.usage.prompt_tokens == result.usage.total_tokens > len(TEXTS)


def test_base64_dimensions_and_token_inputs(loaded: LiveNeuron, tiny_embedding_dir: Path) -> None:
    client = loaded.openai()
    floats = client.embeddings.create(model=EMBEDDER, input="the cat sings").data[0].embedding
    assert len(floats) == 64
    # the SDK asks for base64 by default and decodes it; ask raw to see the wire form
    with loaded.http() as http:
        raw = http.post(
            "/v1/embeddings",
            json={"model": EMBEDDER, "input": "the cat sings", "encoding_format": "base64"},
        ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert_close(list(struct.unpack(f"<{len(packed) // 4}f", packed)), floats)
    short = client.embeddings.create(model=EMBEDDER, input="the cat sings", dimensions=16)
    head = floats[:16]
    norm = math.sqrt(sum(x * x for x in head))
    assert_close(short.data[0].embedding, [x / norm for x in head])
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_embedding_dir).encode("the cat sings")
    by_ids = client.embeddings.create(model=EMBEDDER, input=[ids])
    assert_close(by_ids.data[0].embedding, floats)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": EMBEDDER}, "input"),
        ({"model": EMBEDDER, "input": []}, "input"),
        ({"model": EMBEDDER, "input": ["ok", ""]}, "input[1]"),
        ({"model": EMBEDDER, "input": [1, "a"]}, "input"),
        ({"model": EMBEDDER, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": EMBEDDER, "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": EMBEDDER, "input": "x", "dimensions": 65}, "dimensions"),
        ({"model": EMBEDDER, "input": " ".join(["word"] * 400)}, "input[0]"),
        ({"model": LLAMA, "input": "x"}, "model"),
        ({"model": EMBEDDER, "input": [[3, 10**6]]}, None),  # outside the vocabulary
    ],
)
def test_bad_requests_are_typed_400s(
    loaded: LiveNeuron, body: dict[str, object], param: str | None
) -> None:
    with loaded.http() as http:
        response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_an_embedding_model_refuses_chat_and_says_so(loaded: LiveNeuron) -> None:
    with loaded.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": EMBEDDER, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 400, response.text
    assert "/v1/embeddings" in response.json()["error"]["message"]
    models = loaded.models()
    assert models[EMBEDDER]["capabilities"] == ["embeddings"]
    assert "embeddings" not in models[LLAMA]["capabilities"]


def test_a_model_not_loaded_is_a_404(loaded: LiveNeuron) -> None:
    with loaded.http() as http:
        response = http.post(
            "/v1/embeddings", json={"model": "huggingface:acme/nothing", "input": "x"}
        )
    assert response.status_code == 404, response.text
