"""A light process that speaks the neuron API and answers instantly: the upstream of the gateway
benchmarks and the simulated fleet of the scale benchmark.

One process serves ``--nodes N`` simulated neurons on one port, each under a path prefix
(``http://127.0.0.1:PORT/n7``): the gateway appends ``/discovery``, ``/models`` and
``/v1/chat/completions`` to whatever endpoint it is given, so a prefix is a whole neuron, and 500
neurons cost one socket and one event loop instead of 500 processes on a 2-core machine. With
``--nodes 0`` the routes are at the root (a bare fake OpenAI server for LiteLLM and nginx).

Streams send ``max_tokens`` chunks (default 16), each with different text (LiteLLM aborts a
stream after 100 identical chunks), then a usage chunk and ``[DONE]``.

Run: ``python -m benchmarks.fake_neuron --listen 127.0.0.1:0 --nodes 10 --models 4``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

from aiohttp import web

MODEL_PREFIX = "huggingface:bench/"
GIB = 2**30


def model_ids(node_index: int, models: int) -> list[str]:
    """Every node holds the shared ``bench/fake`` plus ``models - 1`` models of its own."""
    own = [f"{MODEL_PREFIX}n{node_index}-m{j}" for j in range(1, models)]
    return [f"{MODEL_PREFIX}fake", *own]


def _models_answer(node_index: int, models: int) -> bytes:
    now = time.time()
    entries = [
        {
            "id": model_id,
            "harness": "echo",
            "device": "cpu",
            "state": "ready",
            "memory_bytes": 64 * 2**20,
            "load_seconds": 0.01,
            "loaded_at": now,
            "last_used": now,
            "in_flight": 0,
            "context_length": 4096,
            "error": None,
        }
        for model_id in model_ids(node_index, models)
    ]
    return json.dumps({"models": entries}).encode()


def _discovery_answer(name: str) -> bytes:
    return json.dumps(
        {
            "node": name,
            "host": "bench",
            "version": "bench",
            "default_source": "huggingface",
            "devices": [
                {
                    "key": "cpu",
                    "kind": "cpu",
                    "index": 0,
                    "name": "cpu",
                    "total_memory": 64 * GIB,
                    "free_memory": 60 * GIB,
                    "state": "ok",
                    "queue_depth": 0,
                }
            ],
            "harnesses": [{"name": "echo", "plugin": "bench"}],
            "sources": [
                {"scheme": "huggingface", "plugin": "bench", "endpoint": "", "has_token": False}
            ],
        }
    ).encode()


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    ).encode()


def _chunk(model: str, delta: dict[str, str], finish: str | None, index: int) -> bytes:
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = str(body.get("model", "bench/fake"))
    if not body.get("stream"):
        return web.Response(body=_completion(model), content_type="application/json")
    chunks = int(body.get("max_tokens") or 16)
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
    )
    await response.prepare(request)
    await response.write(_chunk(model, {"role": "assistant", "content": ""}, None, 0))
    for i in range(chunks):
        await response.write(_chunk(model, {"content": f" t{i}"}, None, i))
    await response.write(_chunk(model, {}, "length", chunks))
    usage = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": chunks + 5},
    }
    await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def build_app(nodes: int, models: int) -> web.Application:
    app = web.Application()
    health = json.dumps({"status": "ok", "node": "bench", "version": "bench"}).encode()

    def node_routes(prefix: str, index: int, name: str) -> None:
        discovery = _discovery_answer(name)
        listing = _models_answer(index, models)

        async def get_health(_r: web.Request) -> web.Response:
            return web.Response(body=health, content_type="application/json")

        async def get_discovery(_r: web.Request) -> web.Response:
            return web.Response(body=discovery, content_type="application/json")

        async def get_models(_r: web.Request) -> web.Response:
            return web.Response(body=listing, content_type="application/json")

        app.router.add_get(f"{prefix}/health", get_health)
        app.router.add_get(f"{prefix}/discovery", get_discovery)
        app.router.add_get(f"{prefix}/models", get_models)
        app.router.add_post(f"{prefix}/v1/chat/completions", _chat)
        app.router.add_post(f"{prefix}/chat/completions", _chat)

    if nodes == 0:
        node_routes("", 0, "fake")
    for index in range(nodes):
        node_routes(f"/n{index}", index, f"n{index}")
    return app


async def _serve(host: str, port: int, nodes: int, models: int) -> None:
    runner = web.AppRunner(build_app(nodes, models), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on http://{host}:{bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--nodes", type=int, default=0, help="simulated neurons (0: at the root)")
    parser.add_argument("--models", type=int, default=1, help="models per simulated neuron")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(host, int(port), args.nodes, args.models))


if __name__ == "__main__":
    main()
