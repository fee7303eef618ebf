"""Every error the neuron API promises: the right status, a typed OpenAI envelope, Retry-After
where retrying can work, and never a traceback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.neuron.conftest import LiveNeuron


@pytest.fixture(scope="module")
def ready(neuron: LiveNeuron) -> LiveNeuron:
    neuron.load("acme/tiny-llama")
    neuron.load("acme/echo")
    return neuron


def post(neuron: LiveNeuron, path: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    with neuron.http() as client:
        if isinstance(body, bytes | str):
            response = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = client.post(path, json=body)
    payload = response.json()
    if response.status_code != 200:
        error = payload["error"]
        assert set(error) >= {"message", "type", "param", "code"}, payload
        assert "Traceback" not in error["message"]
    return response.status_code, payload, dict(response.headers)


def chat(**overrides: Any) -> dict[str, Any]:
    return {"model": "acme/echo", "messages": [{"role": "user", "content": "hi"}], **overrides}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(n=17), "n"),  # at most 16
        (chat(n=0), "n"),
        (chat(temperature=3), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_completion_tokens=1.5), "max_completion_tokens"),
        (chat(top_p=1.5), "top_p"),
        (chat(stop=7), "stop"),
        (chat(stream="yes"), "stream"),
        (chat(logprobs="yes"), "logprobs"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (chat(messages=[]), "messages"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(tools=[{"type": "function"}]), "tools[0].function"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (chat(model="no-slash"), "model"),
    ],
)
def test_bad_chat_bodies_are_typed_400s(ready: LiveNeuron, body: dict, param: str) -> None:
    status, payload, _ = post(ready, "/v1/chat/completions", body)
    assert status == 400
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw", [b"", b"{not json", b"[1, 2]", b'"text"', '{"model": "\xff"}'.encode("latin-1")]
)
def test_malformed_json_is_a_400(ready: LiveNeuron, raw: bytes) -> None:
    status, payload, _ = post(ready, "/v1/chat/completions", raw)
    assert status == 400 and payload["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "acme/echo", "prompt": "x", "echo": True}, "echo"),
        ({"model": "acme/echo", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "acme/echo", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "acme/echo", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "acme/echo", "prompt": 5}, "prompt"),
    ],
)
def test_bad_completion_bodies_are_400s(ready: LiveNeuron, body: dict, param: str) -> None:
    status, payload, _ = post(ready, "/v1/completions", body)
    assert status == 400 and payload["error"]["param"] == param


def test_token_ids_outside_the_vocabulary_are_a_400(ready: LiveNeuron) -> None:
    body = {"model": "acme/tiny-llama", "prompt": [1, 2, 999999], "max_tokens": 2}
    status, payload, _ = post(ready, "/v1/completions", body)
    assert status == 400 and "vocabulary" in payload["error"]["message"]
    assert ready.models()["huggingface:acme/tiny-llama"]["state"] == "ready"


def test_model_not_loaded_is_404_model_not_found(ready: LiveNeuron) -> None:
    client = ready.openai()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="acme/not-loaded", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="acme/not-loaded", prompt="x")


def test_context_length_exceeded_names_both_numbers(ready: LiveNeuron) -> None:
    client = ready.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="acme/tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=250
        )
    error = caught.value.body
    assert error["code"] == "context_length_exceeded"
    assert "250" in error["message"] and "256" in error["message"]
    long_prompt = "the cat sings " * 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="acme/tiny-llama", prompt=long_prompt)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "256" in caught.value.body["message"]


def test_load_errors(ready: LiveNeuron) -> None:
    status, payload, _ = post(ready, "/models/load", {"model_id": "acme"})
    assert status == 400 and payload["error"]["code"] == "missing_slash"
    status, payload, _ = post(ready, "/models/load", {"model_id": "../etc/passwd"})
    assert status == 400 and payload["error"]["code"] == "unsafe_model_id"
    status, payload, _ = post(ready, "/models/load", {"model_id": "nowhere:acme/echo"})
    assert status == 400 and payload["error"]["code"] == "unknown_scheme"
    assert "huggingface" in payload["error"]["message"]
    status, payload, _ = post(ready, "/models/load", {"model_id": "acme/does-not-exist"})
    assert status == 422 and payload["error"]["details"]["kind"] == "repo_not_found"
    assert payload["error"]["details"]["model_id"] == "huggingface:acme/does-not-exist"
    status, payload, _ = post(ready, "/models/load", {"model_id": "acme/readme-only"})
    assert status == 422 and payload["error"]["details"]["kind"] == "no_loadable_weights"
    status, payload, _ = post(ready, "/models/load", {"model_id": "acme/weights-only"})
    assert status == 422 and payload["error"]["code"] == "no_harness"
    assert "torch" in payload["error"]["message"]
    status, payload, _ = post(ready, "/models/load", {"model_id": "acme/echo", "harness": "nope"})
    assert status == 200  # already ready: success at once, whatever else was asked
    status, payload, _ = post(
        ready, "/models/load", {"model_id": "acme/slow-echo", "harness": "nope"}
    )
    assert status == 400 and payload["error"]["param"] == "harness"
    status, payload, _ = post(
        ready, "/models/load", {"model_id": "acme/slow-echo", "harness": "torch"}
    )
    assert status == 422 and payload["error"]["code"] == "harness_rejects_repo"
    status, payload, _ = post(
        ready, "/models/load", {"model_id": "acme/slow-echo", "device": "tpu:9"}
    )
    assert status == 400 and payload["error"]["param"] == "device"
    status, payload, _ = post(ready, "/models/load", {"model_id": 5})
    assert status == 400
    # refused loads leave nothing behind
    assert set(ready.models()) == {"huggingface:acme/echo", "huggingface:acme/tiny-llama"}


def test_unload_unknown_is_404(ready: LiveNeuron) -> None:
    status, payload, _ = post(ready, "/models/unload", {"model_id": "acme/never-loaded"})
    assert status == 404 and payload["error"]["code"] == "model_not_found"
    status, payload, _ = post(ready, "/models/unload", {"model_id": "bad"})
    assert status == 400
    status, payload, _ = post(ready, "/models/unload", {})
    assert status == 400


def test_load_that_does_not_fit_is_503_naming_required_and_free(
    neuron_factory: Callable[..., LiveNeuron],
) -> None:
    small = neuron_factory(devices={"cpu": {"memory_mb": 4}})
    status, payload, headers = post(small, "/models/load", {"model_id": "acme/tiny-llama"})
    assert status == 503 and "Retry-After" in {k.title() for k in headers}
    error = payload["error"]
    assert error["code"] == "insufficient_memory"
    details = error["details"]
    assert details["required_bytes"] > details["free_bytes"] == 4 * 2**20
    assert "MiB free" in error["message"] and "needs about" in error["message"]
    assert small.models() == {}


def test_full_device_queue_is_503_with_retry_after(
    neuron_factory: Callable[..., LiveNeuron],
) -> None:
    live = neuron_factory(devices={"cpu": {"memory_mb": 1024, "max_queue": 2}})
    live.load("acme/echo")
    worker = live.node.workers.get("cpu")
    assert worker is not None
    release = threading.Event()
    loop = asyncio.new_event_loop()

    async def fill() -> None:
        for _ in range(2):
            worker.submit(lambda: release.wait(30))

    loop.run_until_complete(fill())
    try:
        status, payload, headers = post(live, "/v1/chat/completions", chat())
        assert status == 503 and payload["error"]["code"] == "queue_full"
        assert int(headers["retry-after"]) >= 1
        with pytest.raises(openai.InternalServerError):
            live.openai().chat.completions.create(**chat())
        text = live.http().get("/metrics").text
        assert 'neuron_queue_depth{device="cpu"} 2.0' in text
    finally:
        release.set()
        loop.close()
    live.wait_for(lambda: worker.queue_depth == 0)
    assert live.openai().chat.completions.create(**chat()).choices[0].message.content
    assert live.models()["huggingface:acme/echo"]["in_flight"] == 0


def test_unknown_route_is_an_envelope_404(ready: LiveNeuron) -> None:
    with ready.http() as client:
        response = client.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_full_device_refuses_new_requests_and_never_cuts_a_running_stream(
    neuron_factory: Callable[..., LiveNeuron],
) -> None:
    """``max_queue`` bounds requests, not jobs: with room for one, a running stream keeps
    queueing its decode jobs (one token per job at 20 tokens/s) while every new request is
    refused at once; the stream ends normally, and its place is free again afterwards. (When
    the bound counted jobs, the stream's own next job was refused here and the answer ended
    in a ``queue_full`` error frame.)"""
    live = neuron_factory(devices={"cpu": {"memory_mb": 1024, "max_queue": 1}})
    live.load("acme/slow-echo")
    live.load("acme/echo")
    client = live.openai()
    stream = client.chat.completions.create(
        model="acme/slow-echo",
        messages=[{"role": "user", "content": "go"}],
        # 2 s of tokens: the stream is still running on the neuron while this client, however
        # slow a loaded machine makes it, reads its third to ninth chunks
        max_tokens=40,
        stream=True,
    )
    pieces: list[str] = []
    refused = 0
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
        if len(pieces) in (3, 6, 9):  # mid-stream: the only place is taken
            status, payload, headers = post(live, "/v1/chat/completions", chat())
            assert status == 503 and payload["error"]["code"] == "queue_full", payload
            assert "requests in progress (max_queue 1)" in payload["error"]["message"]
            assert int(headers["retry-after"]) >= 1
            refused += 1
    assert refused == 3
    assert finish == "length"
    assert "".join(pieces).split() == [f"word{i}" for i in range(40)]
    worker = live.node.workers.get("cpu")
    assert worker is not None
    live.wait_for(lambda: worker.requests_in_progress == 0 and worker.queue_depth == 0)
    assert client.chat.completions.create(**chat()).choices[0].message.content


def test_a_stream_whose_client_left_gives_its_place_back(
    neuron_factory: Callable[..., LiveNeuron],
) -> None:
    """With room for one request, a client that leaves a stream early frees the device for
    the next one (the admission is released however the stream ends)."""
    live = neuron_factory(devices={"cpu": {"memory_mb": 1024, "max_queue": 1}})
    live.load("acme/slow-echo")
    worker = live.node.workers.get("cpu")
    assert worker is not None
    body = {
        "model": "acme/slow-echo",
        "messages": [{"role": "user", "content": "go"}],
        "stream": True,
    }
    for _ in range(3):
        with live.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if '"word1' in line:  # two tokens in: leave
                    break
        live.wait_for(lambda: worker.requests_in_progress == 0)
    assert live.models()["huggingface:acme/slow-echo"]["in_flight"] == 0
