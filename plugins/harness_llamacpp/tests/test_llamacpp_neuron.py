"""GGUF models end to end: a registry serving a two-quant GGUF repo, a real ``neuron run`` process,
and the official openai SDK as the client — the operator's path, with llama.cpp underneath."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.testing.registry import RunningRegistry, publish_repo, start_registry
from cortex.testing.servers import ProcessServer, python_program

pytest.importorskip("llama_cpp")

REPO = "acme/tiny-GGUF"
OTHER_REPO = "acme/tiny-GGUF-copy"
MODEL = f"huggingface:{REPO}"
OTHER_MODEL = f"huggingface:{OTHER_REPO}"
NEURON_ENV = {
    "CORTEX_LLAMACPP_N_THREADS": "1",
    # Off: reproducible output whatever ran before (see test_llamacpp_harness.DEFAULTS); the
    # reference below uses the same mode.
    "CORTEX_LLAMACPP_FLASH_ATTN": "off",
    "CORTEX_PLUGINS": "harness-llamacpp,source-huggingface",
}


@pytest.fixture(scope="module")
def registry(
    tiny_gguf_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningRegistry]:
    root = tmp_path_factory.mktemp("registry")
    publish_repo(root, REPO, tiny_gguf_repo)
    publish_repo(root, OTHER_REPO, tiny_gguf_repo)
    with start_registry(root) as running:
        yield running


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="module")
def neuron(
    registry: RunningRegistry, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessServer]:
    config = tmp_path_factory.mktemp("neuron") / "neuron.toml"
    config.write_text(
        f"""
[sources.huggingface]
endpoint = "{registry.url}"
cache_dir = "{cache_dir}"

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
            f"{server.url}/models/load", json={"model_id": REPO, "quant": "f16"}, timeout=120
        )
        assert response.status_code == 200, response.text
        yield server


@pytest.fixture
def client(neuron: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, content: str, **kwargs: object) -> openai.types.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        **kwargs,
    )


def reference(path: Path, content: str, n: int) -> tuple[list[int], str]:
    """Greedy ids and text from llama-cpp-python's own Llama on the same file and prompt."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, flash_attn=False, verbose=False)
    try:
        rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "", "")(
            messages=[{"role": "user", "content": content}]
        )
        prompt = llm.tokenize(rendered.prompt.encode(), add_bos=False, special=True)
        ids = list(itertools.islice(llm.generate(prompt, temp=0.0), n))
        return ids, llm.detokenize(ids).decode("utf-8", errors="replace")
    finally:
        llm.close()


def cached_ggufs(cache_dir: Path, repo: str) -> list[str]:
    folder = cache_dir / f"models--{repo.replace('/', '--')}"
    return sorted(p.name for p in folder.rglob("*.gguf"))


def neuron_rss_bytes(neuron: ProcessServer) -> int:
    assert neuron.proc is not None
    status = Path(f"/proc/{neuron.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


# ---- loading -----------------------------------------------------------------------------------


def test_load_by_quant_fetches_only_that_file(neuron: ProcessServer, cache_dir: Path) -> None:
    models = httpx.get(f"{neuron.url}/models").json()["models"]
    entry = next(m for m in models if m["id"] == MODEL)
    assert entry["harness"] == "llamacpp"
    assert entry["state"] == "ready"
    assert entry["device"] == "cpu"
    assert entry["context_length"] == 256
    assert entry["memory_bytes"] > 0
    assert cached_ggufs(cache_dir, REPO) == ["tiny-F16.gguf"]


def test_load_upper_case_quant_and_unload_frees_memory(
    neuron: ProcessServer, cache_dir: Path
) -> None:
    before = neuron_rss_bytes(neuron)
    # A context of 256k tokens makes the KV cache (256 bytes a token, 64 MiB) big enough to see,
    # and bigger than glibc's largest mmap threshold, so freeing it returns it to the system.
    response = httpx.post(
        f"{neuron.url}/models/load",
        json={"model_id": OTHER_REPO, "quant": "F32", "context_length": 262144},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    entry = response.json()["model"]
    assert entry["memory_bytes"] >= 262144 * 256
    assert cached_ggufs(cache_dir, OTHER_REPO) == ["tiny-F32.gguf"]
    loaded = neuron_rss_bytes(neuron)
    assert loaded - before > 48 * 2**20
    unloaded = httpx.post(f"{neuron.url}/models/unload", json={"model_id": OTHER_MODEL})
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["freed_bytes"] == entry["memory_bytes"]
    deadline = time.monotonic() + 10
    while neuron_rss_bytes(neuron) > before + 32 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert neuron_rss_bytes(neuron) < loaded - 48 * 2**20
    ids = [m["id"] for m in httpx.get(f"{neuron.url}/models").json()["models"]]
    assert OTHER_MODEL not in ids


def test_unknown_quant_is_refused_with_the_available_ones(neuron: ProcessServer) -> None:
    response = httpx.post(
        f"{neuron.url}/models/load", json={"model_id": OTHER_REPO, "quant": "q4_k_m"}, timeout=60
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "F16" in error["message"] and "F32" in error["message"]


# ---- generation --------------------------------------------------------------------------------


def test_greedy_chat_equals_llama_cpp_python(client: openai.OpenAI, tiny_gguf_repo: Path) -> None:
    content = "the quick dog sings today"
    reply = greedy(client, content, max_tokens=24)
    ids, text = reference(tiny_gguf_repo / "tiny-F16.gguf", content, 24)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == len(ids) == 24
    assert reply.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_and_reports_usage(client: openai.OpenAI) -> None:
    whole = greedy(client, "a red bird", max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a red bird"}],
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_max_tokens_and_stop_strings(client: openai.OpenAI) -> None:
    short = greedy(client, "the cat runs", max_tokens=3)
    assert short.usage.completion_tokens == 3
    assert short.choices[0].finish_reason == "length"
    full = greedy(client, "the cat runs", max_tokens=30).choices[0].message.content
    stop = full[8:11]
    assert stop and stop in full
    stopped = greedy(client, "the cat runs", max_tokens=30, stop=[stop])
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_endpoint(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="the small cat", max_tokens=6, temperature=0
    )
    assert completion.usage.completion_tokens == 6
    assert completion.choices[0].text


def test_concurrent_streams_each_match_their_solo_run(neuron: ProcessServer) -> None:
    prompts = ["one two", "a blue fish", "the old house", "rain and snow", "hello world"]
    client = openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)
    solo = [greedy(client, p, max_tokens=16).choices[0].message.content for p in prompts]

    async def stream(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        response = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=16,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in response if c.choices])

    async def all_streams() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{neuron.url}/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(stream(aclient, p) for p in prompts))
        finally:
            await aclient.close()

    # Five streams share one llama.cpp context (4 KV sequences): each gets its own output.
    assert asyncio.run(all_streams()) == solo


def test_cancelled_stream_stops_and_the_model_stays_usable(
    neuron: ProcessServer, client: openai.OpenAI
) -> None:
    def cancelled_count() -> float:
        metrics = httpx.get(f"{neuron.url}/metrics").text
        pattern = (
            rf'neuron_generations_total{{model="{re.escape(MODEL)}",reason="cancelled"}} (\S+)'
        )
        match = re.search(pattern, metrics)
        return float(match.group(1)) if match else 0.0

    # 200 tokens of this model take ~40 ms now that a worker job runs several steps: on a
    # loaded machine the neuron may finish before it notices the client left (finish
    # "length"), so a try only counts once the cancel is seen; a few tries always see one.
    for _ in range(5):
        before = cancelled_count()
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "the cat"}],
            max_tokens=200,
            stream=True,
        )
        received = 0
        for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if received >= 2:
                break
        response.close()
        deadline = time.monotonic() + 2
        while cancelled_count() <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        if cancelled_count() > before:
            break
    assert cancelled_count() == before + 1
    models = httpx.get(f"{neuron.url}/models").json()["models"]
    assert next(m for m in models if m["id"] == MODEL)["in_flight"] == 0
    assert greedy(client, "the cat", max_tokens=4).usage.completion_tokens == 4


def test_prompt_longer_than_the_context_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        greedy(client, "the cat runs " * 200, max_tokens=4)
    assert caught.value.status_code == 400
    assert "context" in str(caught.value)


def test_parse_returns_a_validated_object(client: openai.OpenAI) -> None:
    """Structured output through llama.cpp's grammar sampler (GBNF from the JSON Schema):
    the random model's answer validates, whole and streamed."""
    from typing import Literal

    import pydantic

    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str = pydantic.Field(max_length=12)
        age: int = pydantic.Field(ge=0, le=120)
        role: Literal["admin", "user", "guest"]

    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    whole = client.chat.completions.parse(
        model=MODEL,
        messages=ask,
        response_format=Person,
        max_tokens=160,
        temperature=0,  # type: ignore[arg-type]
    )
    assert isinstance(whole.choices[0].message.parsed, Person)
    with client.chat.completions.stream(
        model=MODEL,
        messages=ask,
        response_format=Person,
        max_tokens=160,
        temperature=0.8,
        seed=1,  # type: ignore[arg-type]
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


def test_json_strings_never_hold_raw_control_characters(client: openai.OpenAI) -> None:
    """JSON forbids a raw control character (U+0000-U+001F) inside a string: it must be written
    as an escape. llama-cpp-python's converter lets its string rule take any character but
    ``"`` and ``\\``, so a sampled answer could hold a raw tab or \\x19 and fail ``json.loads``
    (found by sampling a free-length string field of the tiny GGUF). Every sampled answer
    here, free strings and a pattern's ``.`` included, must parse."""
    import json

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 60},
            "code": {"type": "string", "pattern": "^a..$"},
        },
        "required": ["name", "code"],
        "additionalProperties": False,
    }
    form = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    parsed = 0
    for seed in range(8):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"name {seed}"}],
            response_format=form,  # type: ignore[arg-type]
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"
        text = choice.message.content or ""
        assert json.loads(text)["code"].startswith("a"), repr(text)
        parsed += 1
    assert parsed == 8
