"""How a generation's tokens reach the client: the scheduler hands each stream the tokens of
one or more iterations at once (one cross-thread hand-off per iteration, merged when the event
loop is busy), and the stream writes each hand-off in one send. Whatever the grouping, the
client reads the same frames: one per token, in order, with the same end."""

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

from cortex.testing.registry import RunningRegistry, publish_repo, start_registry
from cortex.testing.servers import ProcessServer, python_program
from cortex.wire import sse
from tests.neuron.conftest import LiveNeuron, echo_repo, neuron_config, start_neuron

LLAMA = "huggingface:acme/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story about the river and the old bridge."}]
# Paced copies of the echo models make one token per iteration a few ms apart, so each token
# is its own hand-off and its own send; the instant ones make many tokens per hand-off.
PACE = 400.0
REPLY = "hello there friend, the cat sings of rivers and old stone bridges"
SCRIPTS: dict[str, dict[str, Any]] = {
    "echo": {"reply": REPLY},
    "think": {"reply": "The answer.", "reasoning": "Let me see.", "opens_think": True},
    "tool": {
        "reply": "It is sunny.",
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    },
}


@pytest.fixture(scope="module")
def delivery_neuron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNeuron]:
    """Each script of :data:`SCRIPTS` as an instant and a paced echo model, and an instant echo
    model whose step raises after 5 tokens (a harness error after good tokens)."""
    root = tmp_path_factory.mktemp("delivery-repos")
    for name, spec in SCRIPTS.items():
        publish_repo(root, f"acme/{name}", echo_repo(**spec))
        publish_repo(root, f"acme/{name}-paced", echo_repo(**spec, tokens_per_second=PACE))
    reply = " ".join(f"word{i}" for i in range(20))
    publish_repo(root, "acme/fails", echo_repo(reply=reply, fail_after=5))
    # 50 ms between tokens: even a busy machine writes the first before the second exists
    publish_repo(root, "acme/echo-slow", echo_repo(reply=REPLY, tokens_per_second=20))
    registry = start_registry(root)
    live = start_neuron(neuron_config(registry.url, tmp_path_factory.mktemp("delivery-cache")))
    yield live
    live.stop()
    registry.stop()


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


def test_max_tokens_is_exact(loaded: LiveNeuron) -> None:
    texts = {}
    for max_tokens in (1, 2, 6, 7):
        texts[max_tokens], produced = stream_text(loaded, max_tokens)
        assert produced == max_tokens
    assert texts[7].startswith(texts[6]) and texts[2].startswith(texts[1])


def test_an_error_after_good_steps_still_delivers_their_tokens(
    delivery_neuron: LiveNeuron,
) -> None:
    delivery_neuron.load("acme/fails")
    stream = delivery_neuron.openai().chat.completions.create(
        model="huggingface:acme/fails", messages=MESSAGES, stream=True
    )
    parts = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == "word0 word1 word2 word3 word4"
    assert "scripted failure" in str(caught.value)


# ---- one send per hand-off: the same SSE frames, fewer writes -----------------------------


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
    text = re.sub(rb'"id":"(chatcmpl|cmpl)-[0-9A-Za-z]+"', rb'"id":"\1-X"', text)
    text = re.sub(rb'"created":\d+', b'"created":0', text)
    text = re.sub(rb'"id":"call_[0-9A-Za-z]+"', b'"id":"call_X"', text)
    return [frame + b"\n\n" for frame in text.split(b"\n\n") if frame]


def content_frames(chunk: bytes) -> int:
    """Frames carrying generated text (not the role frame, not the finish frame)."""
    return len(re.findall(rb'"(?:content|text)":"[^"]', chunk))


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


CASES = [
    ("echo", {}),
    ("echo", {"stop": ["the cat"]}),  # the stop matcher holds text back across deltas
    ("echo", {"stop": ["zzz", "ing"]}),  # a stop string inside a token
    ("echo", {"max_tokens": 7}),
    ("think", {}),  # reasoning frames, then content
    ("tool", {"tools": [WEATHER_TOOL]}),  # a tool-call frame
]
ROUTE_CASES = [("/v1/chat/completions", *case) for case in CASES] + [
    ("/v1/completions", script, extra) for script, extra in CASES if script == "echo"
]


@pytest.mark.parametrize(("route", "script", "extra"), ROUTE_CASES)
def test_tokens_together_or_one_by_one_give_the_same_frames(
    delivery_neuron: LiveNeuron, script: str, extra: dict[str, Any], route: str
) -> None:
    bodies = {}
    for model in (f"acme/{script}", f"acme/{script}-paced"):
        delivery_neuron.load(model)
        body: dict[str, Any] = {
            "model": f"acme/{script}",  # the same id in every frame
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        if route == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "go"}]
        else:
            body["prompt"] = "go"
        bodies[model] = body
    together = raw_stream(delivery_neuron.url, route, bodies[f"acme/{script}"])
    paced_body = {**bodies[f"acme/{script}-paced"], "model": f"acme/{script}-paced"}
    one_by_one = raw_stream(delivery_neuron.url, route, paced_body)
    paced_frames = [
        f.replace(b"acme/" + script.encode() + b"-paced", b"acme/" + script.encode())
        for f in frames_of(one_by_one)
    ]
    assert frames_of(together) == paced_frames


def test_the_first_token_leaves_alone(delivery_neuron: LiveNeuron) -> None:
    """A paced model: the role frame, then the first token's frame in a write of its own, as
    soon as it was made (batching never delays the first token)."""
    delivery_neuron.load("acme/echo-slow")
    body = {
        "model": "acme/echo-slow",
        "messages": [{"role": "user", "content": "go"}],
        "stream": True,
    }
    chunks = raw_stream(delivery_neuron.url, "/v1/chat/completions", body)
    assert content_frames(chunks[1]) == 1


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
    assert frames[-1] == sse.DONE
    # the worker makes tokens faster than the event loop takes them: the outbox merges many
    # iterations into one hand-off, written in one send
    assert len(chunks) < 50
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)  # a write never splits a frame
