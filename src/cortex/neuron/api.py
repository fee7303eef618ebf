"""The neuron's HTTP routes, exactly per the neuron HTTP API contract (docs/architecture.md).

Routes only: handlers read raw JSON and structure it themselves (``cortex.neuron.requests``),
start generations through ``cortex.neuron.start`` and frame answers through
``cortex.neuron.framing``. Every error leaves as the OpenAI envelope with the right status, and
Retry-After when retrying can work. Generation errors before the first byte of a stream are real
HTTP errors; after it, an error frame. A generation's request ends in exactly one place: its
stream's ``close()``, called by the route for a whole answer and by the streaming response's
``release`` for a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cortex import __version__
from cortex.neuron import framing
from cortex.neuron.discovery import discovery_json
from cortex.neuron.embeddings import embed, parse_embedding_request
from cortex.neuron.generation import GenerationStream, run_on_worker
from cortex.neuron.loader import Loader, LoadRequest, parse_model_id
from cortex.neuron.middleware import RequestCounter
from cortex.neuron.models import READY
from cortex.neuron.node import Node
from cortex.neuron.output import output_parser
from cortex.neuron.requests import parse_chat_request, parse_completion_request
from cortex.neuron.start import ready_entry, render_prompt, start_chat, start_completion
from cortex.wire.errors import ApiError, bad_request
from cortex.wire.http import install_error_handlers, read_json_object
from cortex.wire.stream_response import WatchedStreamingResponse

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20


def create_app(node: Node, loader: Loader | None = None, lifespan: Any = None) -> FastAPI:
    """The neuron's ASGI app over an already-built :class:`Node`."""
    loader = loader or Loader(node)
    app = FastAPI(title="neuron", version=__version__, lifespan=lifespan, docs_url=None)
    app.state.node = node
    app.state.loader = loader
    install_error_handlers(app)

    app.add_middleware(RequestCounter, node=node)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        status = "ok"
        if node.draining:
            status = "draining"
        elif node.default_models.pending:
            status = "starting"
        return {
            "status": status,
            "node": node.name,
            "version": __version__,
            "default_models": node.default_models.to_json(),
        }

    @app.get("/discovery")
    async def discovery() -> dict[str, Any]:
        return await asyncio.to_thread(discovery_json, node)

    @app.get("/models")
    async def models() -> dict[str, Any]:
        return {"models": [entry.to_json() for entry in node.models.all()]}

    @app.post("/models/load", response_model=None)
    async def load(request: Request) -> dict[str, Any] | JSONResponse:
        body = await read_json_object(request, MAX_BODY_BYTES)
        if node.draining:
            raise ApiError(503, "draining", "this neuron is shutting down", retry_after=30)
        wait = body.get("wait", True)
        if not isinstance(wait, bool):
            raise bad_request("'wait' must be true or false", param="wait")
        entry = await loader.load(LoadRequest.from_json(body), wait=wait)
        if not wait and entry.state != READY:
            return JSONResponse({"model": entry.to_json()}, status_code=202)
        return {"model": entry.to_json()}

    @app.post("/models/estimate")
    async def estimate(request: Request) -> dict[str, Any]:
        body = await read_json_object(request, MAX_BODY_BYTES)
        return await loader.estimate(body)

    @app.post("/models/unload")
    async def unload(request: Request) -> dict[str, Any]:
        body = await read_json_object(request, MAX_BODY_BYTES)
        if "model_id" not in body:
            raise bad_request("'model_id' is required", param="model_id")
        return await loader.unload(body["model_id"])

    @app.post("/admin/release-memory")
    async def release_memory() -> dict[str, Any]:
        """Drop cached KV state and allocator caches of idle models."""
        for entry in node.models.all():
            if entry.state == READY and entry.in_flight == 0 and entry.handle is not None:
                await run_on_worker(entry, entry.handle.reset, internal=True)
        return {"released": True}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_json_object(request, MAX_BODY_BYTES)
        model = body.get("model")
        if not isinstance(model, str):
            raise bad_request("'model' is required", param="model")
        entry = ready_entry(node, model)
        if "messages" in body:
            ids = await render_prompt(entry, parse_chat_request(body))
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
            handle = entry.handle
            assert handle is not None
            ids = await run_on_worker(entry, lambda: handle.tokenize(text))
        else:
            raise bad_request("give 'messages' (chat) or 'prompt' (a string)", param="messages")
        return {"model": entry.id, "count": len(ids), "context_length": entry.context_length}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.monotonic()
        chat = parse_chat_request(await read_json_object(request, MAX_BODY_BYTES))
        entry = ready_entry(node, chat.options.model)
        streams, opens_reasoning = await start_chat(node, entry, chat, started)
        parsers = [
            output_parser(bool(chat.tools), starts_in_reasoning=opens_reasoning) for _ in streams
        ]
        if chat.options.stream:
            frames = framing.chat_frames(streams, chat.options, request, parsers)
            return _GenerationResponse(frames, streams)
        try:
            return JSONResponse(await framing.chat_whole(streams, request, parsers))
        finally:
            _close(streams)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        req = parse_completion_request(await read_json_object(request, MAX_BODY_BYTES))
        entry = ready_entry(node, req.options.model)
        streams = await start_completion(node, entry, req, started)
        if req.options.stream:
            frames = framing.completion_frames(streams, req.options, request)
            return _GenerationResponse(frames, streams)
        try:
            return JSONResponse(await framing.completion_whole(streams, request))
        finally:
            _close(streams)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        req = parse_embedding_request(await read_json_object(request, MAX_BODY_BYTES))
        return await embed(ready_entry(node, req.model), req)

    @app.get("/metrics")
    async def metrics() -> Response:
        node.refresh_gauges()
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class _GenerationResponse(WatchedStreamingResponse):
    """A streamed generation. Its :meth:`release` closes the streams (which ends the request:
    the generations, the device admission, the in-flight count) once the response is over,
    also when the client left before the body started (the body's ``finally`` would then
    never run)."""

    def __init__(self, body: AsyncIterator[bytes], streams: list[GenerationStream]) -> None:
        # Its last frames and the chunked terminator go out in one write (LastChunk); a client
        # that leaves cancels the body.
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._streams = streams

    def release(self) -> None:
        _close(self._streams)


def _close(streams: list[GenerationStream]) -> None:
    """End a generation request: every choice's stream (the first one's close ends the
    request itself)."""
    for stream in streams:
        stream.close()


__all__ = ["create_app", "parse_model_id"]
