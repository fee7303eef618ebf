"""vLLM end to end: a registry serving a tiny safetensors repo, a real ``neuron run`` process with
only the vLLM harness, the official openai SDK against it, and a gateway in front of it for the
openai and anthropic SDKs. The same checks as the torch harness's neuron tests
(``tests/neuron/test_generation.py``): greedy parity (here with vLLM's own ``LLM.generate``),
streaming, usage, stop strings, seeds, interleaving, cancellation, tools in the template, and
memory back after an unload."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pydantic
import pytest

from cortex.config import (
    CortexConfig,
    Duration,
    EvictionSection,
    GatewaySection,
    ModelProfile,
    ModelsConfig,
    NeuronRef,
)
from cortex.testing.registry import RunningRegistry, publish_repo, start_registry
from cortex.testing.servers import ProcessServer, UvicornThread, python_program

REPO = "acme/tiny-vllm"
OTHER_REPO = "acme/tiny-vllm-copy"
MODEL = f"huggingface:{REPO}"
OTHER_MODEL = f"huggingface:{OTHER_REPO}"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me a story about the river and the old bridge."},
]
NEURON_ENV = {
    "CORTEX_PLUGINS": "harness-vllm,source-huggingface",
    "CORTEX_TEST_NO_TOKEN": "",
    "CUDA_VISIBLE_DEVICES": "",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
LOAD_TIMEOUT = 300


@pytest.fixture(scope="module")
def registry(
    tiny_vllm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningRegistry]:
    root = tmp_path_factory.mktemp("registry")
    publish_repo(root, REPO, tiny_vllm_dir)
    publish_repo(root, OTHER_REPO, tiny_vllm_dir)
    with start_registry(root) as running:
        yield running


@pytest.fixture(scope="module")
def neuron(
    registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessServer]:
    folder = tmp_path_factory.mktemp("neuron")
    config = folder / "neuron.toml"
    config.write_text(
        f"""
name = "vllm-node"

[sources.huggingface]
endpoint = "{registry.url}"
auth_env = "CORTEX_TEST_NO_TOKEN"
cache_dir = "{folder / "cache"}"

[devices."cpu"]
memory_mb = 4096
"""
    )
    server = ProcessServer(
        python_program("cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0"),
        env=NEURON_ENV,
    )
    with server:
        response = httpx.post(
            f"{server.url}/models/load",
            json={"model_id": REPO, "max_batch": 8, "kv_tokens": 4096},
            timeout=LOAD_TIMEOUT,
        )
        assert response.status_code == 200, response.text
        yield server


@pytest.fixture(scope="module")
def reference(tiny_vllm_dir: Path):
    """vLLM's own ``LLM`` on the same files in this process: greedy ids for a chat."""
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_vllm_dir, local_files_only=True)
    llm = LLM(
        model=str(tiny_vllm_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=16 * 2**20,
    )

    def greedy(messages: list[dict[str, Any]], n: int) -> tuple[list[int], str]:
        params = VllmSamplingParams(temperature=0, max_tokens=n)
        output = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
        ids = list(output.token_ids)
        eos = tokenizer.eos_token_id
        stop = next((i for i, t in enumerate(ids) if t == eos), None)
        text = tokenizer.decode(ids[:stop], skip_special_tokens=True)
        return ids, text

    yield greedy
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture
def client(neuron: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)


def models_of(neuron: ProcessServer) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(f"{neuron.url}/models").json()["models"]}


def metric(neuron: ProcessServer, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{neuron.url}/metrics").text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        sample, _, label_text = key.partition("{")
        parts = sorted(p for p in label_text.rstrip("}").split(",") if p)
        if sample == name and ",".join(parts) == wanted:
            return float(value)
    return 0.0


def wait_for(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def rss_bytes(server: ProcessServer) -> int:
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


# ---- the model on the node -------------------------------------------------------------------


def test_models_shows_vllms_own_capacity(neuron: ProcessServer) -> None:
    entry = models_of(neuron)[MODEL]
    assert entry["harness"] == "vllm"
    assert entry["state"] == "ready"
    assert entry["device"] == "cpu"
    assert entry["batched"] is True
    assert entry["max_batch"] == 8
    assert entry["context_length"] == 256
    # vLLM's blocks (128 positions on CPU) less a spare block per sequence: at least the
    # 4096 asked for, in whole blocks
    assert entry["kv_tokens"] >= 4096 and entry["kv_tokens"] % 128 == 0
    assert entry["memory_bytes"] > 0


# ---- generation: the same behaviour as every harness -------------------------------------------


def test_greedy_matches_vllms_own_llm_chat(client: openai.OpenAI, reference) -> None:
    ids, expected_text = reference(MESSAGES, 48)
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=48, temperature=0
    )
    assert response.choices[0].message.content == expected_text
    assert response.usage.completion_tokens == len(ids)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == response.usage.prompt_tokens > 0


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt="the quick cat", max_tokens=12, temperature=0
    )
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens <= 12
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="the quick cat",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_never_emitted(client: openai.OpenAI, reference, stream: bool) -> None:
    _, full = reference(MESSAGES, 40)
    words = full.split()
    assert len(words) > 6, full
    stop = " " + words[4]  # a word in the middle: the text ends right before it
    cut = full[: full.index(stop)]
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 40,
        "temperature": 0,
        "stop": [stop, "zzzz"],
    }
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    else:
        response = client.chat.completions.create(**kwargs)
        assert response.choices[0].finish_reason == "stop"
        text = response.choices[0].message.content
    assert text == cut


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 20,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.3,
    }
    first = client.chat.completions.create(**params).choices[0].message.content
    assert client.chat.completions.create(**params).choices[0].message.content == first
    extra = {"top_k": 5, "repetition_penalty": 1.3}
    one = client.chat.completions.create(**params, extra_body=extra).choices[0].message.content
    two = client.chat.completions.create(**params, extra_body=extra).choices[0].message.content
    assert one == two
    other = client.chat.completions.create(**{**params, "seed": 99}).choices[0].message.content
    assert other != first


def test_two_streams_interleave(client: openai.OpenAI, reference) -> None:
    _, expected = reference(MESSAGES, 120)
    arrivals: dict[str, list[float]] = {"a": [], "b": []}
    texts: dict[str, str] = {}

    def run(name: str) -> None:
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0, stream=True
        )
        parts = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals[name].append(time.monotonic())
                parts.append(chunk.choices[0].delta.content)
        texts[name] = "".join(parts)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts["a"] == texts["b"] == expected
    a, b = arrivals["a"], arrivals["b"]
    assert b[0] < a[-1] and a[0] < b[-1]


def test_disconnected_stream_is_aborted(neuron: ProcessServer) -> None:
    cancelled = metric(neuron, "neuron_generations_total", model=MODEL, reason="cancelled")
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 200}
    with (
        httpx.Client(base_url=neuron.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        received = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received >= 3:
                break
    wait_for(lambda: models_of(neuron)[MODEL]["in_flight"] == 0)
    wait_for(
        lambda: (
            metric(neuron, "neuron_generations_total", model=MODEL, reason="cancelled")
            == cancelled + 1
        )
    )
    assert models_of(neuron)[MODEL]["running"] == 0


def test_tools_are_rendered_by_the_chat_template(neuron: ProcessServer) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    with httpx.Client(base_url=neuron.url, timeout=30) as http:
        plain = http.post("/tokenize", json={"model": REPO, "messages": ask}).json()["count"]
        with_tools = http.post(
            "/tokenize", json={"model": REPO, "messages": ask, "tools": tools}
        ).json()["count"]
    assert with_tools > plain + 20


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false

    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    tags: list[pydantic.constr(max_length=6)] = pydantic.Field(max_length=3)  # type: ignore[valid-type]


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2])
def test_parse_returns_a_validated_object(client: openai.OpenAI, seed: int) -> None:
    """vLLM's structured outputs (guidance backend) hold a random-weight model to the schema."""
    answer = client.chat.completions.parse(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        response_format=Person,
        max_tokens=200,
        temperature=1.0,
        seed=seed,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Person)
    assert choice.message.content == choice.message.parsed.model_dump_json(), "compact JSON"


def test_streamed_json_object_parses(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=1.0,
        seed=3,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


@pytest.fixture(scope="module")
def long_model(
    neuron: ProcessServer, registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The tiny model with a 1024-token context: the template writes the tools' schemas into
    the prompt, and the tiny tokenizer spends a token on nearly every JSON character."""
    from cortex.testing.tiny_models import build_tiny_model

    from .conftest import VLLM_SHAPE

    folder = tmp_path_factory.mktemp("tiny-vllm-1k") / "llama"
    publish_repo(
        registry.root,
        "acme/tiny-vllm-1k",
        build_tiny_model(folder, shape=VLLM_SHAPE, context_length=1024),
    )
    response = httpx.post(
        f"{neuron.url}/models/load",
        json={"model_id": "acme/tiny-vllm-1k", "max_batch": 2, "kv_tokens": 2048},
        timeout=LOAD_TIMEOUT,
    )
    assert response.status_code == 200, response.text
    return "huggingface:acme/tiny-vllm-1k"


def test_required_tool_calls_follow_their_schema(client: openai.OpenAI, long_model: str) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": WEATHER, "strict": True},
        }
    ]
    answer = client.chat.completions.create(
        model=long_model,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=120,
        temperature=1.0,
        seed=4,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert calls
    for call in calls:
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)  # type: ignore[union-attr]


def test_a_schema_that_cannot_be_enforced_is_a_400(neuron: ProcessServer) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 5,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "bogus"}},
        },
    }
    answer = httpx.post(f"{neuron.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_response_format" and error["param"] == "response_format"


def test_models_lists_what_a_vllm_model_can_do(neuron: ProcessServer) -> None:
    capabilities = set(models_of(neuron)[MODEL]["capabilities"])
    assert {"chat", "tools", "logprobs", "structured_output"} <= capabilities


def test_logprobs_are_the_models_log_softmax(client: openai.OpenAI, tiny_vllm_dir: Path) -> None:
    """vLLM's sample logprobs through the neuron equal transformers' log_softmax of the same
    step (float32 on both sides)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    answer = client.completions.create(
        model=MODEL, prompt="the river and the old bridge", max_tokens=6, temperature=0, logprobs=3
    )
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and len(logprobs.token_logprobs or []) == 6
    tokenizer = AutoTokenizer.from_pretrained(tiny_vllm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_vllm_dir, local_files_only=True).eval()
    prompt = list(tokenizer.encode("the river and the old bridge", add_special_tokens=True))
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
    )
    generated = out[0, len(prompt) :].tolist()
    with torch.inference_mode():
        rows = torch.log_softmax(model(out).logits[0].float(), dim=-1)
    for i, (token, value, top) in enumerate(
        zip(generated, logprobs.token_logprobs or [], logprobs.top_logprobs or [], strict=True)
    ):
        row = rows[len(prompt) - 1 + i]
        assert value == pytest.approx(float(row[token]), abs=1e-3)
        assert len(top) == 3
        expected = sorted(row.tolist(), reverse=True)[:3]
        assert sorted(top.values(), reverse=True) == pytest.approx(expected, abs=1e-3)


def test_unload_gives_the_memory_back(neuron: ProcessServer) -> None:
    """A second load with a KV cache big enough to see (2 layers x 1 KV head x 32 x 2 x 4 bytes
    = 512 bytes a position: 256k positions are 128 MiB), then its unload."""
    before = rss_bytes(neuron)
    response = httpx.post(
        f"{neuron.url}/models/load",
        json={"model_id": OTHER_REPO, "kv_tokens": 262144, "max_batch": 4},
        timeout=LOAD_TIMEOUT,
    )
    assert response.status_code == 200, response.text
    entry = response.json()["model"]
    assert entry["kv_tokens"] >= 262144
    assert entry["memory_bytes"] >= 262144 * 512
    loaded = rss_bytes(neuron)
    assert loaded - before > 100 * 2**20
    response = httpx.post(
        f"{neuron.url}/models/unload", json={"model_id": OTHER_REPO}, timeout=LOAD_TIMEOUT
    )
    assert response.status_code == 200, response.text
    assert OTHER_MODEL not in models_of(neuron)
    after = rss_bytes(neuron)
    assert loaded - after > 100 * 2**20, (before, loaded, after)
    # the first model still serves
    reply = httpx.post(
        f"{neuron.url}/v1/completions",
        json={"model": REPO, "prompt": "the cat", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


# ---- through the gateway -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(neuron: ProcessServer) -> Iterator[str]:
    from cortex.gateway.app import create_app
    from cortex.gateway.service import Gateway, load_strategy

    config = CortexConfig(
        gateway=GatewaySection(poll_interval=Duration(0.2), load_timeout=Duration(LOAD_TIMEOUT)),
        eviction=EvictionSection(strategy="lru"),
        neurons=[NeuronRef("vllm-node", neuron.url)],
    )
    models = ModelsConfig(
        models=[ModelProfile(id=REPO, harness="vllm", memory_mb=200)],
        aliases={"tiny": REPO},
    )
    server = UvicornThread(create_app(Gateway(config, models, load_strategy("lru")))).start()
    yield server.url
    server.stop()


def test_openai_sdk_through_the_gateway(gateway: str, reference) -> None:
    _, expected = reference([{"role": "user", "content": "hello"}], 8)
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert raw.headers["x-cortex-model"] == MODEL
    assert raw.parse().choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_anthropic_sdk_through_the_gateway(gateway: str, reference) -> None:
    _, expected = reference([{"role": "user", "content": "hello"}], 8)
    client = anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0, timeout=120)
    message = client.messages.create(
        model="tiny",
        max_tokens=8,
        messages=[{"role": "user", "content": "hello"}],
        extra_body={"temperature": 0},
    )
    assert message.content[0].text == expected
    assert message.usage.output_tokens == 8
    assert message.stop_reason == "max_tokens"
    with client.messages.stream(
        model="tiny",
        max_tokens=8,
        messages=[{"role": "user", "content": "hello"}],
        extra_body={"temperature": 0},
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == expected
