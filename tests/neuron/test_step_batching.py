"""Several decode steps per device-worker job: the same tokens in fewer hand-offs (fair turns
between streams: test_generation.py::test_two_streams_on_one_device_interleave).

The neuron runs in this process, so the batching knobs of ``cortex.neuron.generation`` are set
per test with ``monkeypatch`` (a generous time budget makes the step count, not the machine's
load, decide how many tokens one job runs)."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cortex.neuron import generation
from cortex.testing.registry import RunningRegistry, publish_repo, start_registry
from cortex.testing.servers import ProcessServer, python_program
from cortex.wire import sse
from tests.neuron.conftest import LiveNeuron, echo_repo, neuron_config, start_neuron

LLAMA = "huggingface:acme/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story about the river and the old bridge."}]


@pytest.fixture(scope="module")
def loaded(neuron: LiveNeuron) -> LiveNeuron:
    neuron.load("acme/tiny-llama")
    return neuron


def stream_text(neuron: LiveNeuron, max_tokens: int) -> tuple[str, int]:
    """The streamed text and the completion tokens the final usage chunk reports."""
    stream = neuron.openai().chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, produced = [], 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return "".join(parts), produced


def worker_jobs(neuron: LiveNeuron) -> int:
    worker = neuron.node.workers.get("cpu")
    assert worker is not None
    neuron.wait_for(lambda: worker.queue_depth == 0, timeout=5)
    return worker.jobs_done


def test_batched_steps_give_the_same_tokens_in_fewer_jobs(
    loaded: LiveNeuron, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 1)
    before = worker_jobs(loaded)
    one_per_job, produced_single = stream_text(loaded, 48)
    single_jobs = worker_jobs(loaded) - before

    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 16)
    before = worker_jobs(loaded)
    batched, produced_batched = stream_text(loaded, 48)
    batched_jobs = worker_jobs(loaded) - before

    assert batched == one_per_job and produced_batched == produced_single == 48
    # the same fixed jobs (render, start, final flush, close) around 48 step jobs, against
    # the prefill alone, then ceil(47 / 16) = 3 jobs
    assert single_jobs - batched_jobs == 48 - (1 + 3)


def test_max_tokens_is_exact_when_not_a_multiple_of_the_batch(
    loaded: LiveNeuron, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 4)
    for max_tokens in (1, 2, 6, 7):
        _, produced = stream_text(loaded, max_tokens)
        assert produced == max_tokens


@pytest.fixture(scope="module")
def failing_neuron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNeuron]:
    """An instant echo model whose step raises after 5 tokens (a harness error mid-batch)."""
    root = tmp_path_factory.mktemp("failing-repos")
    reply = " ".join(f"word{i}" for i in range(20))
    publish_repo(root, "acme/fails", echo_repo(reply=reply, fail_after=5))
    registry = start_registry(root)
    live = start_neuron(neuron_config(registry.url, tmp_path_factory.mktemp("failing-cache")))
    live.load("acme/fails")
    yield live
    live.stop()
    registry.stop()


def text_until_error(neuron: LiveNeuron) -> tuple[str, str]:
    stream = neuron.openai().chat.completions.create(
        model="huggingface:acme/fails", messages=MESSAGES, stream=True
    )
    parts = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    return "".join(parts), str(caught.value)


def test_an_error_after_good_steps_still_delivers_their_tokens(
    failing_neuron: LiveNeuron, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 1)
    one_per_job = text_until_error(failing_neuron)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 16)
    batched = text_until_error(failing_neuron)
    assert batched == one_per_job
    assert batched[0].startswith("word0 word1") and "word5" not in batched[0]
    assert "scripted failure" in batched[1]


# ---- one send per decode job: the same SSE frames, fewer writes ----------------------------


def raw_stream(url: str, path: str, body: dict[str, Any]) -> list[bytes]:
    """POST over a plain socket; the body's HTTP chunks, one per ASGI send (uvicorn writes each
    ``http.response.body`` message of a response without a length as one chunk)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while part := sock.recv(65536):
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def frames_of(chunks: list[bytes]) -> list[bytes]:
    """The SSE frames, with the per-response id and timestamp made equal."""
    text = b"".join(chunks)
    text = re.sub(rb'"id":"(chatcmpl|cmpl)-[0-9a-f]+"', rb'"id":"\1-X"', text)
    text = re.sub(rb'"created":\d+', b'"created":0', text)
    text = re.sub(rb'"id":"call_[0-9A-Za-z]+"', b'"id":"call_X"', text)
    return [frame + b"\n\n" for frame in text.split(b"\n\n") if frame]


def content_frames(chunk: bytes) -> int:
    """Frames carrying generated text (not the role frame, not the finish frame)."""
    return len(re.findall(rb'"(?:content|text)":"[^"]', chunk))


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_decode_job_leaves_in_one_send_with_the_same_frames(
    loaded: LiveNeuron, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    body: dict[str, Any] = {
        "model": LLAMA,
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if route == "/v1/chat/completions":
        body["messages"] = MESSAGES
    else:
        body["prompt"] = MESSAGES[0]["content"]
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 1)
    per_token = raw_stream(loaded.url, route, body)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 16)
    batched = raw_stream(loaded.url, route, body)

    # what the client reads is byte for byte the same: one frame per token, same order, same
    # finish and usage frames
    assert frames_of(batched) == frames_of(per_token)
    usage = json.loads(frames_of(batched)[-2][len(b"data: ") : -2])["usage"]
    assert usage["completion_tokens"] == 40
    texts = sum(content_frames(chunk) for chunk in per_token)
    assert texts > 15  # a token whose text is not complete yet (half a character) makes none
    # one token per job: a send per text frame (the last one shares its send with the end:
    # finish, usage, [DONE]); batched: the prefill's token alone (time to first token), then
    # 39 tokens in ceil(39 / 16) = 3 jobs, the last with the end (a job whose tokens all ended
    # mid-character sends nothing)
    assert len(per_token) >= texts
    role = 1 if route == "/v1/chat/completions" else 0  # the chat stream's role frame
    assert len(batched) <= role + 1 + 3
    assert max(content_frames(chunk) for chunk in batched) >= 5


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("acme/echo", {"stop": ["the cat"]}),  # the stop matcher holds text back across deltas
        ("acme/echo", {"stop": ["zzz", "ing"]}),  # a stop string inside the last token
        ("acme/think-echo", {}),  # reasoning frames, then content
        ("acme/tool-echo", {"tools": [WEATHER_TOOL]}),  # a tool-call frame
    ],
)
def test_stops_reasoning_and_tool_calls_give_the_same_frames_batched(
    neuron: LiveNeuron, monkeypatch: pytest.MonkeyPatch, model: str, extra: dict[str, Any]
) -> None:
    neuron.load(model)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "go"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 1)
    per_token = raw_stream(neuron.url, "/v1/chat/completions", body)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 16)
    batched = raw_stream(neuron.url, "/v1/chat/completions", body)
    assert frames_of(batched) == frames_of(per_token)
    assert len(batched) < len(per_token)


@pytest.fixture(scope="module")
def long_echo_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    root = tmp_path_factory.mktemp("long-echo-repos")
    reply = " ".join(f"word{i}" for i in range(100))
    publish_repo(root, "acme/long-echo", echo_repo(reply=reply))
    registry = start_registry(root)
    yield registry
    registry.stop()


def test_neuron_run_sends_several_frames_per_write(
    long_echo_registry: RunningRegistry, tmp_path: Path
) -> None:
    """``neuron run`` as a real process, an instant model: the stream's 100 token frames arrive
    in far fewer HTTP chunks (socket writes), each frame intact."""
    config = tmp_path / "neuron.toml"
    config.write_text(
        f'name = "writes"\n[sources.huggingface]\nendpoint = "{long_echo_registry.url}"\n'
        f'auth_env = "CORTEX_TEST_NO_TOKEN"\ncache_dir = "{tmp_path / "cache"}"\n'
    )
    args = python_program(
        "cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0"
    )
    with ProcessServer(args, env={"CORTEX_TEST_NO_TOKEN": ""}) as server:
        assert server.url is not None
        load = {"model_id": "acme/long-echo"}
        httpx.post(f"{server.url}/models/load", json=load, timeout=60).raise_for_status()
        body = {
            "model": "acme/long-echo",
            "messages": [{"role": "user", "content": "go"}],
            "stream": True,
        }
        chunks = raw_stream(server.url, "/v1/chat/completions", body)
    frames = frames_of(chunks)
    words = [json.loads(f[6:-2])["choices"][0]["delta"].get("content") for f in frames[1:-2]]
    assert "".join(words) == " ".join(f"word{i}" for i in range(100))
    assert len(words) == 100  # still one frame per token
    # the role frame, then the first token alone, as soon as the prefill produced it
    assert content_frames(chunks[1]) == 1
    assert frames[-1] == sse.DONE
    # the prefill's token alone, then up to 16 tokens per job: at most ~8 writes for 100
    # tokens when the machine is quiet; a loaded machine cuts jobs at their 4 ms budget
    assert len(chunks) < 50
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)  # a write never splits a frame
