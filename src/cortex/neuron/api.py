"""The neuron's HTTP routes, exactly per the neuron HTTP API contract (docs/architecture.md).

Handlers read raw JSON and structure it themselves (cortex.neuron.requests); every error leaves
as the OpenAI envelope with the right status, and Retry-After when retrying can work. Generation
errors before the first byte of a stream are real HTTP errors; after it, an error frame.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring_ascii
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cortex import __version__
from cortex.neuron.discovery import discovery_json
from cortex.neuron.generation import (
    GenerationStream,
    check_context,
    ready_entry,
    run_on_worker,
    start_admitted,
)
from cortex.neuron.loader import Loader, LoadRequest, parse_model_id
from cortex.neuron.models import READY
from cortex.neuron.node import Node
from cortex.neuron.output import (
    ContentDelta,
    OutputEvent,
    OutputParser,
    ReasoningDelta,
    output_parser,
)
from cortex.neuron.requests import (
    ChatRequest,
    CompletionRequest,
    check_content_parts,
    parse_chat_request,
    parse_completion_request,
)
from cortex.wire import sse
from cortex.wire.errors import ApiError, bad_request
from cortex.wire.http import install_error_handlers, read_json_object
from cortex.wire.stream_response import LastChunk, WatchedStreamingResponse
from cortex.wire.toolcalls import prompt_opens_reasoning

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
            chat = parse_chat_request(body)
            check_content_parts(chat.messages, accepted_parts(entry))
            ids = await _render(entry, chat)
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
        check_content_parts(chat.messages, accepted_parts(entry))
        entry.begin_request()
        node.metrics.series(node.metrics.in_flight, entry.id).inc()
        try:
            stream, opens_reasoning = await _render_and_start(node, entry, chat, started)
        except BaseException:
            _end(node, entry)
            raise
        parser = output_parser(bool(chat.tools), starts_in_reasoning=opens_reasoning)
        if chat.options.stream:
            return _sse(
                _chat_stream(node, entry, stream, chat, request, parser), node, entry, stream
            )
        try:
            return JSONResponse(await _chat_whole(stream, request, parser))
        finally:
            _end(node, entry)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        req = parse_completion_request(await read_json_object(request, MAX_BODY_BYTES))
        entry = ready_entry(node, req.options.model)
        entry.begin_request()
        node.metrics.series(node.metrics.in_flight, entry.id).inc()
        try:
            stream = await _tokenize_and_start(node, entry, req, started)
        except BaseException:
            _end(node, entry)
            raise
        if req.options.stream:
            return _sse(_completion_stream(node, entry, stream, req, request), node, entry, stream)
        try:
            return JSONResponse(await _completion_whole(stream, request))
        finally:
            _end(node, entry)

    @app.get("/metrics")
    async def metrics() -> Response:
        _refresh_gauges(node)
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


# ---- helpers -------------------------------------------------------------------------------


class RequestCounter:
    """Counts requests by route template and status. A plain ASGI middleware (not
    ``BaseHTTPMiddleware``, whose wrapped ``receive`` reports a disconnect as soon as a
    streaming response has started, which would cut every stream short)."""

    def __init__(self, app: Any, node: Node) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.monotonic()

        async def send_and_record(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics = self.node.metrics
            metrics.series(metrics.requests, path, str(status)).inc()
            metrics.series(metrics.duration, path).observe(time.monotonic() - started)


def accepted_parts(entry: Any) -> frozenset[str]:
    """The non-text content part types the loaded model takes: a harness's loaded model may
    declare ``accepted_content_parts`` (e.g. ``frozenset({"image_url"})`` for a vision model);
    none does today, so every image, audio or file part is refused with a typed 400."""
    declared = getattr(entry.handle, "accepted_content_parts", None)
    return frozenset(declared) if declared else frozenset()


def _end(node: Node, entry: Any) -> None:
    entry.end_request()
    node.metrics.series(node.metrics.in_flight, entry.id).dec()


async def _render(entry: Any, chat: ChatRequest) -> list[int]:
    ids, _opens = await _render_chat(entry, chat)
    return ids


# Enough trailing prompt tokens to hold an opened ``<think>`` plus the whitespace after it.
_REASONING_TAIL_TOKENS = 16


async def _render_chat(entry: Any, chat: ChatRequest) -> tuple[list[int], bool]:
    """The prompt ids, and whether the rendered prompt opens ``<think>`` (DeepSeek-R1 / Qwen3
    style templates): such models write reasoning first and only close it, so the output parser
    must start inside the reasoning or it would leak into ``content``."""
    handle = entry.handle
    if handle is None:
        raise ApiError(503, "model_unloading", f"{entry.id} is being unloaded", retry_after=5)
    messages, tools = chat.messages, chat.tools

    def job() -> tuple[list[int], bool]:
        ids = list(handle.render_chat(messages, tools))
        tail = handle.decode(ids[-_REASONING_TAIL_TOKENS:]) if ids else ""
        return ids, prompt_opens_reasoning(tail)

    return tuple(await run_on_worker(entry, job))  # type: ignore[return-value]


async def _render_and_start(
    node: Node, entry: Any, chat: ChatRequest, started: float
) -> tuple[GenerationStream, bool]:
    """:func:`_render_chat` and :func:`_start` in one worker job (one hand-off to the device
    worker and back instead of two; same checks in the same order, same errors)."""
    handle = entry.handle
    if handle is None:
        raise ApiError(503, "model_unloading", f"{entry.id} is being unloaded", retry_after=5)
    messages, tools, options = chat.messages, chat.tools, chat.options
    opens: list[bool] = []

    def build() -> GenerationStream:
        ids = list(handle.render_chat(messages, tools))
        tail = handle.decode(ids[-_REASONING_TAIL_TOKENS:]) if ids else ""
        opens.append(prompt_opens_reasoning(tail))
        stream = _new_stream(node, entry, ids, options, started)
        stream.start_on_worker(handle)
        return stream

    stream = await start_admitted(entry, build)
    return stream, opens[0]


async def _tokenize_and_start(
    node: Node, entry: Any, req: CompletionRequest, started: float
) -> GenerationStream:
    """Tokenise the prompt (400 when empty) and :func:`_start`, in one worker job (as
    :func:`_render_and_start`)."""
    if req.prompt_ids is not None:
        return await _start(node, entry, req.prompt_ids, req.options, started)
    handle = entry.handle
    if handle is None:
        raise ApiError(503, "model_unloading", f"{entry.id} is being unloaded", retry_after=5)
    text, options = req.prompt_text or "", req.options

    def build() -> GenerationStream:
        ids = list(handle.tokenize(text))
        if not ids:
            raise bad_request("the prompt is empty after tokenization", param="prompt")
        stream = _new_stream(node, entry, ids, options, started)
        stream.start_on_worker(handle)
        return stream

    return await start_admitted(entry, build)


def _new_stream(
    node: Node, entry: Any, prompt_ids: list[int], options: Any, started: float
) -> GenerationStream:
    max_tokens = check_context(
        entry, len(prompt_ids), options.max_tokens, clamp=options.clamp_max_tokens
    )
    return GenerationStream(node, entry, prompt_ids, options, max_tokens, started)


async def _start(
    node: Node, entry: Any, prompt_ids: list[int], options: Any, started: float
) -> GenerationStream:
    stream = _new_stream(node, entry, prompt_ids, options, started)
    await stream.start()
    return stream


class _GenerationResponse(WatchedStreamingResponse):
    """A streamed generation. Its :meth:`release` closes the generation (giving back its
    device admission) and ends the request's in-flight count once the response is over, also
    when the client left before the body started (its ``finally`` would then never run)."""

    def __init__(
        self, body: AsyncIterator[bytes], node: Node, entry: Any, stream: GenerationStream
    ) -> None:
        # Its last frames and the chunked terminator go out in one write (LastChunk); a client
        # that leaves cancels the body, whose ``finally`` closes the generation at once.
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._ended = (node, entry, stream)

    def release(self) -> None:
        node, entry, stream = self._ended
        stream.close()
        _end(node, entry)


def _sse(
    body: AsyncIterator[bytes], node: Node, entry: Any, stream: GenerationStream
) -> StreamingResponse:
    return _GenerationResponse(body, node, entry, stream)


async def _batches_until_disconnect(
    stream: GenerationStream, request: Request
) -> AsyncIterator[list[str]]:
    """The stream's deltas, one list per hand-off; stops (and closes the generation at the
    scheduler's next iteration) as soon as the client is gone. The disconnect check runs once
    per hand-off, not per token: its tokens are already generated."""
    iterator = stream.delta_batches()
    try:
        async for texts in iterator:
            if await client_gone(request):
                stream.cancelled = True
                return
            yield texts
    finally:
        await iterator.aclose()
        stream.close()


async def client_gone(request: Request) -> bool:
    """What ``await request.is_disconnected()`` answers (is an ``http.disconnect`` waiting on
    the receive channel right now?), without its trip through the event loop.

    Starlette's version awaits ``receive()`` inside an already-cancelled anyio scope, which
    takes two loop iterations and gives the GIL away while the device worker runs Python
    (measured on the transformers model: ~230 us of event-loop CPU and ~1 ms of worker CPU per
    token at two tokens per job). Here the receive coroutine is stepped once by hand: if it
    finishes at once, its message is the answer; if it would wait, nothing was pending (it is
    closed, which unregisters its waiter) and the client is still there."""
    step = request.receive()
    if not inspect.iscoroutine(step):  # an ASGI server with another receive: the slow way
        return await request.is_disconnected()
    try:
        step.send(None)
    except StopIteration as done:
        message = done.value or {}
        return bool(message.get("type") == "http.disconnect")
    step.close()
    return False


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


# Non-ASCII on purpose: the template is only used when the frame escapes it as json.dumps does
# by default (ensure_ascii), which is what the per-text encoder below writes.
_TEMPLATE_MARK = "\x00cortex-delta\u00e9\x00"


def text_frame_encoder(
    frame: Callable[[str], bytes],
) -> Callable[[str], bytes]:
    """A faster ``frame(text)`` for the per-token hot path: the frame is encoded once with a
    marker string and split around the marker's JSON; each call then JSON-encodes only the text.
    The bytes are identical to ``frame(text)`` by construction (same encoder, same escaping)."""
    encoded = frame(_TEMPLATE_MARK)
    marker = json.dumps(_TEMPLATE_MARK).encode()
    if encoded.count(marker) != 1:  # the marker also sits elsewhere: no template, stay exact
        return frame
    prefix, suffix = encoded.split(marker)
    # json.dumps(a str) with the default encoder *is* this C function (ensure_ascii=True);
    # calling it directly skips json.dumps' argument handling (~0.4 us per token).
    dumps = encode_basestring_ascii

    def encode(text: str) -> bytes:
        return prefix + dumps(text).encode() + suffix

    return encode


def _role_choice() -> dict[str, Any]:
    return {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}


def _event_delta(event: OutputEvent) -> dict[str, Any]:
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    return {"tool_calls": [event.openai_delta()]}


async def _chat_whole(
    stream: GenerationStream, request: Request, parser: OutputParser
) -> dict[str, Any]:
    events: list[OutputEvent] = []
    async for texts in _batches_until_disconnect(stream, request):
        for text in texts:
            events.extend(parser.feed(text))
    events.extend(parser.finish())
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    calls = [e.openai() for e in events if not isinstance(e, ContentDelta | ReasoningDelta)]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content if content or not calls else None,
        "refusal": None,  # required by the spec (strict clients reject a message without it)
    }
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    completion_id, created = _ids("chatcmpl")
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": stream.entry.id,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if calls else stream.finish_reason,
                "stop_sequence": None if calls else stream.stop_sequence,
            }
        ],
        "usage": stream.usage(),
    }


async def _chat_stream(
    node: Node,
    entry: Any,
    stream: GenerationStream,
    chat: ChatRequest,
    request: Request,
    parser: OutputParser,
) -> AsyncIterator[bytes]:
    completion_id, created = _ids("chatcmpl")
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": entry.id,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        return sse.encode_data({**base, "choices": [choice]})

    content_chunk = text_frame_encoder(lambda text: chunk({"content": text}))
    saw_call = saw_content = False
    feed = parser.feed
    # One SSE frame per delta as before, but all frames of one hand-off leave in one send
    # (one socket write): the per-send cost was most of a fast model's per-token overhead.
    frames: list[bytes] = []
    try:
        # The role alone (an empty content here would make a tool-call-only answer assemble
        # to "" where the whole answer says null); with the report_prompt_tokens extension
        # (translated routes) it also carries the prompt's length.
        if chat.options.report_prompt_tokens:
            prompt = stream.prompt_tokens
            usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
            first = {**base, "choices": [_role_choice()], "usage": usage}
            yield sse.encode_data(first)
        else:
            yield chunk({"role": "assistant"})
        try:
            async for texts in _batches_until_disconnect(stream, request):
                for text in texts:
                    for event in feed(text):
                        if type(event) is ContentDelta:
                            frames.append(content_chunk(event.text))
                            saw_content = True
                            continue
                        saw_call = saw_call or not isinstance(event, ContentDelta | ReasoningDelta)
                        frames.append(chunk(_event_delta(event)))
                if frames and stream.finish_reason is None:
                    yield b"".join(frames)
                    frames.clear()
                # else the generation is over: this job's frames leave with the end's frames
            for event in parser.finish():
                saw_call = saw_call or not isinstance(event, ContentDelta | ReasoningDelta)
                saw_content = saw_content or isinstance(event, ContentDelta)
                frames.append(chunk(_event_delta(event)))
        except ApiError as exc:
            frames += (sse.encode_data(exc.openai_body()), sse.DONE)
            yield LastChunk(b"".join(frames))
            return
        if stream.cancelled:
            if frames:  # what the parser still held (the client is gone: as before)
                yield b"".join(frames)
            return
        if saw_call:
            frames.append(chunk({}, "tool_calls", stop_sequence=None))
        else:
            # An empty answer still assembles to "" (as the whole answer's content says)
            delta = {} if saw_content else {"content": ""}
            frames.append(chunk(delta, stream.finish_reason, stop_sequence=stream.stop_sequence))
        if chat.options.include_usage:
            frames.append(sse.encode_data({**base, "choices": [], "usage": stream.usage()}))
        frames.append(sse.DONE)
        yield LastChunk(b"".join(frames))
    finally:
        stream.close()  # at once; the response's release() ends the request


async def _completion_whole(stream: GenerationStream, request: Request) -> dict[str, Any]:
    text = "".join([t async for texts in _batches_until_disconnect(stream, request) for t in texts])
    completion_id, created = _ids("cmpl")
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": stream.entry.id,
        "choices": [
            {"text": text, "index": 0, "logprobs": None, "finish_reason": stream.finish_reason}
        ],
        "usage": stream.usage(),
    }


async def _completion_stream(
    node: Node, entry: Any, stream: GenerationStream, req: CompletionRequest, request: Request
) -> AsyncIterator[bytes]:
    completion_id, created = _ids("cmpl")
    base = {"id": completion_id, "object": "text_completion", "created": created, "model": entry.id}

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return sse.encode_data({**base, "choices": [choice]})

    text_chunk = text_frame_encoder(chunk)
    frames: list[bytes] = []
    try:
        try:
            # one frame per delta, one send per hand-off from the scheduler (as in _chat_stream)
            async for texts in _batches_until_disconnect(stream, request):
                frames = [text_chunk(text) for text in texts]
                if stream.finish_reason is None:
                    yield b"".join(frames)
                    frames = []
        except ApiError as exc:
            yield LastChunk(sse.encode_data(exc.openai_body()) + sse.DONE)
            return
        if stream.cancelled:
            return
        frames.append(chunk("", stream.finish_reason))
        if req.options.include_usage:
            frames.append(sse.encode_data({**base, "choices": [], "usage": stream.usage()}))
        frames.append(sse.DONE)
        yield LastChunk(b"".join(frames))
    finally:
        stream.close()  # at once; the response's release() ends the request


def _refresh_gauges(node: Node) -> None:
    metrics = node.metrics
    for key in node.devices:
        worker = node.workers.get(key)
        metrics.queue_depth.labels(key).set(worker.queue_depth if worker else 0)
        metrics.device_poisoned.labels(key).set(1 if worker is not None and worker.poisoned else 0)
        metrics.device_memory.labels(key, "total").set(node.budget(key))
        metrics.device_memory.labels(key, "used").set(node.used(key))
        metrics.device_memory.labels(key, "free").set(max(0, node.budget(key) - node.used(key)))
    metrics.refresh_schedulers(
        {entry.id: load for entry in node.models.all() if (load := entry.load()) is not None}
    )
    counts: dict[str, int] = {"loading": 0, "ready": 0, "failed": 0, "unloading": 0}
    for entry in node.models.all():
        counts[entry.state] = counts.get(entry.state, 0) + 1
    for state, count in counts.items():
        metrics.models.labels(state).set(count)


__all__ = ["create_app", "parse_model_id"]
