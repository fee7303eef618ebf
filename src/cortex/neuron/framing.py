"""Answer framing: a generation's text deltas as OpenAI ``chat.completion`` /
``text_completion`` objects, whole or as SSE frames.

Every shape comes from :mod:`cortex.wire.openai_types` (the builders the gateway's translators
read back), so the neuron and the gateway agree on each field. One SSE frame per text delta, as
the OpenAI API sends, but the frames of one hand-off from the scheduler leave in one send (one
socket write): on a fast model the per-send cost was most of the per-token overhead. The last
frames and the chunked-encoding terminator leave in one write too (:class:`LastChunk`). An error
after the stream started is an error frame before ``[DONE]``.

The framers only read the stream; closing it is the request's owner's job (the route for a whole
answer, the streaming response's ``release`` for a stream: ``cortex.neuron.api``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from json import dumps as json_dumps
from json.encoder import encode_basestring_ascii
from typing import Any

from starlette.requests import Request

from cortex.neuron.generation import GenerationStream
from cortex.neuron.output import ContentDelta, OutputEvent, OutputParser, ReasoningDelta
from cortex.neuron.requests import GenerationOptions
from cortex.neuron.scheduler import TokenLogprob
from cortex.wire import openai_types as oai
from cortex.wire import sse
from cortex.wire.errors import ApiError
from cortex.wire.stream_response import LastChunk


async def batches_until_disconnect(
    stream: GenerationStream, request: Request
) -> AsyncGenerator[list[str], None]:
    """The stream's deltas, one list per hand-off; stops as soon as the client is gone (the
    owner's close then ends the generation at the scheduler's next iteration). The disconnect
    check runs once per hand-off, not per token: its tokens are already generated."""
    iterator = stream.delta_batches()
    try:
        async for texts in iterator:
            if await client_gone(request):
                stream.cancelled = True
                return
            yield texts
    finally:
        await iterator.aclose()


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


# Non-ASCII on purpose: the template is only used when the frame escapes it as json.dumps does
# by default (ensure_ascii), which is what the per-text encoder below writes.
_TEMPLATE_MARK = "\x00cortex-delta\u00e9\x00"


def text_frame_encoder(frame: Callable[[str], bytes]) -> Callable[[str], bytes]:
    """A faster ``frame(text)`` for the per-token hot path: the frame is encoded once with a
    marker string and split around the marker's JSON; each call then JSON-encodes only the text.
    The bytes are identical to ``frame(text)`` by construction (same encoder, same escaping)."""
    encoded = frame(_TEMPLATE_MARK)
    marker = json_dumps(_TEMPLATE_MARK).encode()
    if encoded.count(marker) != 1:  # the marker also sits elsewhere: no template, stay exact
        return frame
    prefix, suffix = encoded.split(marker)
    # json.dumps(a str) with the default encoder *is* this C function (ensure_ascii=True);
    # calling it directly skips json.dumps' argument handling (~0.4 us per token).
    dumps = encode_basestring_ascii

    def encode(text: str) -> bytes:
        return prefix + dumps(text).encode() + suffix

    return encode


def _entry(logprob: TokenLogprob) -> dict[str, Any]:
    return oai.token_logprob(logprob.token, logprob.logprob, logprob.top)


def _with_logprobs(stream: GenerationStream, texts: list[str]) -> list[tuple[str, list[Any]]]:
    """Each text of a hand-off with the log-probabilities of the tokens behind it (none when
    the request did not ask for them)."""
    if not stream.wants_logprobs:
        return [(text, []) for text in texts]
    return list(zip(texts, stream.batch_logprobs, strict=True))


def _event_delta(event: OutputEvent) -> dict[str, Any]:
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    return {"tool_calls": [event.openai_delta()]}


def _is_call(event: OutputEvent) -> bool:
    return not isinstance(event, ContentDelta | ReasoningDelta)


# ---- several choices -------------------------------------------------------------------------


class _Choice:
    """One choice's streamed frames: a producer yields the frames of each hand-off and leaves
    its last frames (the finish frame) in ``end``, which leave with the stream's end."""

    def __init__(self) -> None:
        self.end: list[bytes] = []


async def _merged(producers: list[AsyncIterator[list[bytes]]]) -> AsyncIterator[list[bytes]]:
    """The frames of several choices as each arrives (one choice: straight through). An error
    in one (an ``ApiError`` mid-stream) ends them all."""
    if len(producers) == 1:
        async for frames in producers[0]:
            yield frames
        return
    queue: asyncio.Queue[tuple[list[bytes] | None, BaseException | None]] = asyncio.Queue()

    async def pump(producer: AsyncIterator[list[bytes]]) -> None:
        try:
            async for frames in producer:
                await queue.put((frames, None))
        except BaseException as exc:
            await queue.put((None, exc))
            return
        await queue.put((None, None))

    tasks = [asyncio.create_task(pump(p)) for p in producers]
    try:
        running = len(tasks)
        while running:
            got, error = await queue.get()
            if error is not None:
                raise error
            if got is None:
                running -= 1
            elif got:
                yield got
    finally:
        for task in tasks:
            task.cancel()


# ---- chat ------------------------------------------------------------------------------------


async def chat_whole(
    streams: list[GenerationStream], request: Request, parsers: list[OutputParser]
) -> dict[str, Any]:
    """The whole ``chat.completion``: one choice per stream, each split into content,
    reasoning and tool calls by its parser; usage counts the prompt once and every choice's
    tokens."""
    answers = await asyncio.gather(
        *(
            _chat_choice(stream, index, request, parser)
            for index, (stream, parser) in enumerate(zip(streams, parsers, strict=True))
        )
    )
    return oai.chat_completion(
        id=oai.completion_id(),
        model=streams[0].entry.id,
        choices=answers,
        prompt_tokens=streams[0].prompt_tokens,
        completion_tokens=sum(s.completion_tokens for s in streams),
    )


async def _chat_choice(
    stream: GenerationStream, index: int, request: Request, parser: OutputParser
) -> dict[str, Any]:
    events: list[OutputEvent] = []
    entries: list[dict[str, Any]] = []
    async for texts in batches_until_disconnect(stream, request):
        for text, logprobs in _with_logprobs(stream, texts):
            events.extend(parser.feed(text))
            entries.extend(_entry(lp) for lp in logprobs)
    events.extend(parser.finish())
    calls = [e.openai() for e in events if _is_call(e)]  # type: ignore[union-attr]
    message = oai.assistant_message(
        "".join(e.text for e in events if isinstance(e, ContentDelta)),
        reasoning_content="".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        tool_calls=calls,
    )
    return oai.chat_choice(
        index=index,
        message=message,
        finish_reason="tool_calls" if calls else stream.finish_reason or "stop",
        stop_sequence=None if calls else stream.stop_sequence,
        logprobs=oai.chat_logprobs(entries) if stream.wants_logprobs else None,
    )


async def chat_frames(
    streams: list[GenerationStream],
    options: GenerationOptions,
    request: Request,
    parsers: list[OutputParser],
) -> AsyncIterator[bytes]:
    """The ``chat.completion.chunk`` frames of a streamed answer: each choice's role frame,
    then its frames as they come (one send per hand-off), then every choice's finish frame,
    the usage frame and ``[DONE]`` in one last write."""
    ids: dict[str, Any] = {
        "id": oai.completion_id(),
        "model": streams[0].entry.id,
        "created": int(time.time()),
    }
    # The role alone (an empty content here would make a tool-call-only answer assemble to ""
    # where the whole answer says null); with the report_prompt_tokens extension (translated
    # routes) the first also carries the prompt's length.
    first = []
    for index in range(len(streams)):
        role = oai.chat_chunk(**ids, delta={"role": "assistant"}, index=index)
        if index == 0 and options.report_prompt_tokens:
            role["usage"] = oai.usage(streams[0].prompt_tokens, 0)
        first.append(sse.encode_data(role))
    yield b"".join(first)
    choices = [_Choice() for _ in streams]
    producers = [
        _chat_choice_frames(stream, index, ids, request, parser, choice)
        for index, (stream, parser, choice) in enumerate(
            zip(streams, parsers, choices, strict=True)
        )
    ]
    try:
        async for frames in _merged(producers):
            yield b"".join(frames)
    except ApiError as exc:
        yield LastChunk(sse.encode_data(exc.openai_body()) + sse.DONE)
        return
    if any(stream.cancelled for stream in streams):
        return  # the client is gone
    end = [frame for choice in choices for frame in choice.end]
    if options.include_usage:
        usage = oai.usage_chunk(
            **ids,
            prompt_tokens=streams[0].prompt_tokens,
            completion_tokens=sum(s.completion_tokens for s in streams),
        )
        end.append(sse.encode_data(usage))
    end.append(sse.DONE)
    yield LastChunk(b"".join(end))


async def _chat_choice_frames(
    stream: GenerationStream,
    index: int,
    ids: dict[str, Any],
    request: Request,
    parser: OutputParser,
    choice: _Choice,
) -> AsyncIterator[list[bytes]]:
    # log-probabilities of tokens whose text made no frame yet (they go with the next frame)
    pending: list[dict[str, Any]] = []

    def chunk(delta: dict[str, Any], finish: str | None = None, stop: str | None = None) -> bytes:
        logprobs = None
        if stream.wants_logprobs:
            logprobs = oai.chat_logprobs(pending[:])
            pending.clear()
        return sse.encode_data(
            oai.chat_chunk(
                **ids,
                delta=delta,
                finish_reason=finish,
                stop_sequence=stop,
                logprobs=logprobs,
                index=index,
            )
        )

    content_chunk = (
        (lambda text: chunk({"content": text}))
        if stream.wants_logprobs  # each frame its own tokens' logprobs: no shared template
        else text_frame_encoder(lambda text: chunk({"content": text}))
    )
    saw_call = saw_content = False
    feed = parser.feed
    frames: list[bytes] = []
    async for texts in batches_until_disconnect(stream, request):
        for text, logprobs in _with_logprobs(stream, texts):
            pending.extend(_entry(lp) for lp in logprobs)
            for event in feed(text):
                if type(event) is ContentDelta:
                    frames.append(content_chunk(event.text))
                    saw_content = True
                    continue
                saw_call = saw_call or _is_call(event)
                frames.append(chunk(_event_delta(event)))
        if frames and stream.finish_reason is None:
            yield frames
            frames = []
        # else the generation is over: these frames leave with the end's frames
    for event in parser.finish():
        saw_call = saw_call or _is_call(event)
        saw_content = saw_content or isinstance(event, ContentDelta)
        frames.append(chunk(_event_delta(event)))
    if stream.cancelled:
        if frames:  # what the parser still held (the client is gone)
            yield frames
        return
    if saw_call:
        frames.append(chunk({}, "tool_calls"))
    else:
        # an empty answer still assembles to "" (as the whole answer's content says)
        delta = {} if saw_content else {"content": ""}
        frames.append(chunk(delta, stream.finish_reason or "stop", stream.stop_sequence))
    choice.end = frames


# ---- completions -------------------------------------------------------------------------------


def _completion_tokens(logprobs: list[TokenLogprob]) -> list[tuple[str, float, Any]]:
    return [(lp.token, lp.logprob, lp.top) for lp in logprobs]


async def completion_whole(streams: list[GenerationStream], request: Request) -> dict[str, Any]:
    answers = await asyncio.gather(
        *(_completion_choice(stream, i, request) for i, stream in enumerate(streams))
    )
    return oai.text_completion(
        id=oai.random_id("cmpl-"),
        model=streams[0].entry.id,
        choices=answers,
        prompt_tokens=streams[0].prompt_tokens,
        completion_tokens=sum(s.completion_tokens for s in streams),
    )


async def _completion_choice(
    stream: GenerationStream, index: int, request: Request
) -> dict[str, Any]:
    texts: list[str] = []
    tokens: list[tuple[str, float, Any]] = []
    async for batch in batches_until_disconnect(stream, request):
        for text, logprobs in _with_logprobs(stream, batch):
            texts.append(text)
            tokens.extend(_completion_tokens(logprobs))
    return oai.completion_choice(
        index=index,
        text="".join(texts),
        finish_reason=stream.finish_reason or "stop",
        logprobs=oai.completion_logprobs(tokens) if stream.wants_logprobs else None,
    )


async def completion_frames(
    streams: list[GenerationStream], options: GenerationOptions, request: Request
) -> AsyncIterator[bytes]:
    """The ``text_completion`` frames of a streamed completion, one send per hand-off; every
    choice's finish frame, the usage frame and ``[DONE]`` in one last write."""
    ids: dict[str, Any] = {
        "id": oai.random_id("cmpl-"),
        "model": streams[0].entry.id,
        "created": int(time.time()),
    }
    choices = [_Choice() for _ in streams]
    producers = [
        _completion_choice_frames(stream, index, ids, request, choice)
        for index, (stream, choice) in enumerate(zip(streams, choices, strict=True))
    ]
    try:
        async for frames in _merged(producers):
            yield b"".join(frames)
    except ApiError as exc:
        yield LastChunk(sse.encode_data(exc.openai_body()) + sse.DONE)
        return
    if any(stream.cancelled for stream in streams):
        return
    end = [frame for choice in choices for frame in choice.end]
    if options.include_usage:
        usage = oai.usage_chunk(
            **ids,
            prompt_tokens=streams[0].prompt_tokens,
            completion_tokens=sum(s.completion_tokens for s in streams),
            object="text_completion",
        )
        end.append(sse.encode_data(usage))
    end.append(sse.DONE)
    yield LastChunk(b"".join(end))


async def _completion_choice_frames(
    stream: GenerationStream,
    index: int,
    ids: dict[str, Any],
    request: Request,
    choice: _Choice,
) -> AsyncIterator[list[bytes]]:
    offset = 0  # where the next token starts in the completion text (logprobs' text_offset)

    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        return sse.encode_data(
            oai.completion_chunk(
                **ids, text=text, finish_reason=finish, logprobs=logprobs, index=index
            )
        )

    def logprobs_chunk(text: str, logprobs: list[TokenLogprob]) -> bytes:
        nonlocal offset
        tokens = _completion_tokens(logprobs)
        frame = chunk(text, logprobs=oai.completion_logprobs(tokens, offset))
        offset += sum(len(token) for token, _, _ in tokens)
        return frame

    text_chunk = text_frame_encoder(chunk)
    frames: list[bytes] = []
    async for texts in batches_until_disconnect(stream, request):
        if stream.wants_logprobs:
            pairs = _with_logprobs(stream, texts)
            frames = [logprobs_chunk(text, logprobs) for text, logprobs in pairs]
        else:
            frames = [text_chunk(text) for text in texts]
        if stream.finish_reason is None:
            yield frames
            frames = []
    if stream.cancelled:
        return
    frames.append(chunk("", stream.finish_reason or "stop"))
    choice.end = frames


__all__ = [
    "batches_until_disconnect",
    "chat_frames",
    "chat_whole",
    "client_gone",
    "completion_frames",
    "completion_whole",
    "text_frame_encoder",
]
