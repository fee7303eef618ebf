"""``/v1/embeddings`` through a real gateway and a neuron with the torch harness, with the
official ``openai`` SDK: the embedding model is cold-loaded on first use, routed like chat,
its vectors equal the neuron's own, and its prompt tokens are metered; a chat model asked for
embeddings (and the embedding model asked to chat) is a typed 400 from the neuron, relayed."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.testing.registry import publish_repo

EMBEDDER = "huggingface:acme/tiny-embedder"


@pytest.fixture
def gw(fleet: Fleet, tiny_embedding_dir: Path, tiny_llama_dir: Path) -> GatewayUnderTest:
    publish_repo(fleet.registry.root, "acme/tiny-embedder", tiny_embedding_dir)
    publish_repo(fleet.registry.root, "acme/tiny-llama", tiny_llama_dir)
    return fleet.gateway(
        models=[
            ModelProfile(id="acme/tiny-embedder", harness="torch", memory_mb=100),
            ModelProfile(id="acme/tiny-llama", harness="torch", memory_mb=200),
        ],
        aliases={"embed": "acme/tiny-embedder", "tiny": "acme/tiny-llama"},
    )


def test_cold_loaded_routed_and_metered(gw: GatewayUnderTest, fleet: Fleet) -> None:
    client = gw.client(timeout=120)
    result = client.embeddings.create(model="embed", input=["the cat sings", "hello"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 64
    assert result.model == "embed"  # the name the client asked for, as on chat
    assert gw.metric("cortex_cold_loads_total", outcome="ok") == 1
    # the same vectors as the neuron that holds the model gives itself
    node = next(n for n in fleet.neurons if EMBEDDER in fleet.neuron_models(n))
    direct = openai.OpenAI(
        base_url=f"{fleet.neuron_url(node)}/v1", api_key="unused", max_retries=0
    ).embeddings.create(model=EMBEDDER, input=["the cat sings", "hello"])
    assert [d.embedding for d in result.data] == [d.embedding for d in direct.data]
    gw.wait_for(lambda: gw.metric("cortex_prompt_tokens_total", model=EMBEDDER) > 0)
    assert gw.metric("cortex_prompt_tokens_total", model=EMBEDDER) == result.usage.prompt_tokens
    assert gw.metric("cortex_requests_total", route="/v1/embeddings", status="ok") == 1


def test_the_wrong_kind_of_model_is_a_typed_400(gw: GatewayUnderTest) -> None:
    client = gw.client(timeout=120)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input="x")
    assert refused.value.code == "unsupported_model"
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "x"}])
    assert "/v1/embeddings" in str(chat.value)
    bad = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "embed"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
