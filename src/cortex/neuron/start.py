"""Starting a generation: from a parsed request to a generation queued on its device.

One place for everything between a route and the scheduler: the model must be ready
(:func:`ready_entry`), its content parts acceptable, the request counted in flight, admitted on
the device (``max_queue``), and in *one* worker job: the chat template rendered (or the prompt
tokenised), the context checked, the generation created and queued on the device's scheduler.
The :class:`~cortex.neuron.generation.GenerationStream` it returns owns the request from then on
and gives everything back in its ``close()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import attrs

from cortex.harness import LOGPROBS, STRUCTURED_OUTPUT, SamplingParams, capabilities_of
from cortex.neuron.generation import GenerationStream, run_on_worker, worker_api_error
from cortex.neuron.models import READY, ModelEntry
from cortex.neuron.node import Node
from cortex.neuron.requests import (
    ChatRequest,
    CompletionRequest,
    GenerationOptions,
    check_content_parts,
)
from cortex.wire.errors import ApiError, bad_request, model_not_found
from cortex.wire.toolcalls import prompt_opens_reasoning

# Enough trailing prompt tokens to hold an opened ``<think>`` plus the whitespace after it.
REASONING_TAIL_TOKENS = 16


def ready_entry(node: Node, raw_model: str) -> ModelEntry:
    """The ready model a request names, or 404 ``model_not_found`` / 503 while loading."""
    from cortex.neuron.loader import parse_model_id

    model_id = str(parse_model_id(node, raw_model, param="model"))
    entry = node.models.get(model_id)
    if entry is None:
        raise model_not_found(model_id, "it is not loaded on this node (POST /models/load)")
    if entry.state != READY or entry.handle is None:
        if entry.state == "loading":
            raise ApiError(503, "model_loading", f"{model_id} is still loading", retry_after=5)
        reason = (entry.error or {}).get("message", "")
        raise ApiError(
            503,
            f"model_{entry.state}",
            f"{model_id} is {entry.state}{': ' + reason if reason else ''}",
            retry_after=30,
        )
    return entry


def accepted_parts(entry: ModelEntry) -> frozenset[str]:
    """The non-text content part types the loaded model takes: a harness's loaded model may
    declare ``accepted_content_parts`` (e.g. ``frozenset({"image_url"})`` for a vision model);
    none does today, so every image, audio or file part is refused with a typed 400."""
    declared = getattr(entry.handle, "accepted_content_parts", None)
    return frozenset(declared) if declared else frozenset()


def check_context(
    entry: ModelEntry, prompt_tokens: int, max_tokens: int | None, clamp: bool = False
) -> int:
    """The effective max_tokens, or 400 ``context_length_exceeded`` naming both numbers.

    ``clamp`` (the ``cortex.clamp_max_tokens`` request extension, set by the gateway on the
    Anthropic and Responses routes) turns a budget larger than the context left into that
    context: Claude Code asks for 32000 tokens whatever the model, and Anthropic's API treats
    max_tokens as a ceiling. OpenAI chat keeps the 400 the OpenAI spec requires."""
    context = entry.context_length or 0
    if prompt_tokens >= context:
        # the prompt alone does not fit: say so, whatever max_tokens asked for (a client that
        # sent a 56k-token prompt to a 4k model needs to hear about the prompt, not max_tokens)
        raise ApiError(
            400,
            "context_length_exceeded",
            f"the prompt has {prompt_tokens} tokens but the model's context is {context} "
            "tokens; shorten the prompt or use a model with a longer context",
            param="messages",
        )
    if clamp and max_tokens is not None:
        max_tokens = min(max_tokens, context - prompt_tokens)
    if max_tokens is None:
        return context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise ApiError(
            400,
            "context_length_exceeded",
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
            f"{prompt_tokens + max_tokens} tokens, over the model's context of {context} tokens",
            param="max_tokens",
        )
    return max_tokens


def _handle(entry: ModelEntry) -> Any:
    handle = entry.handle
    if handle is None:
        raise ApiError(503, "model_unloading", f"{entry.id} is being unloaded", retry_after=5)
    return handle


async def render_prompt(entry: ModelEntry, chat: ChatRequest) -> list[int]:
    """The chat template rendered and tokenised (``POST /tokenize``), on the worker."""
    check_content_parts(chat.messages, accepted_parts(entry))
    handle = _handle(entry)
    messages, tools = chat.messages, chat.tools
    ids = await run_on_worker(entry, lambda: list(handle.render_chat(messages, tools)))
    return list(ids)


async def start_chat(
    node: Node, entry: ModelEntry, chat: ChatRequest, started: float
) -> tuple[list[GenerationStream], bool]:
    """Start a chat generation; also says whether the rendered prompt opens ``<think>``
    (DeepSeek-R1 / Qwen3 style templates: such models write reasoning first and only close it,
    so the output parser must start inside the reasoning or it would leak into ``content``)."""
    check_content_parts(chat.messages, accepted_parts(entry))
    messages, tools = chat.messages, chat.tools
    opens: list[bool] = []

    def prompt(handle: Any) -> list[int]:
        ids = list(handle.render_chat(messages, tools))
        tail = handle.decode(ids[-REASONING_TAIL_TOKENS:]) if ids else ""
        opens.append(prompt_opens_reasoning(tail))
        return ids

    streams = await _start(node, entry, chat.options, prompt, started)
    return streams, opens[0]


async def start_completion(
    node: Node, entry: ModelEntry, req: CompletionRequest, started: float
) -> list[GenerationStream]:
    """Start a completion: the prompt's token ids as given, or its text tokenised (a 400 when
    that leaves nothing)."""
    given, text = req.prompt_ids, req.prompt_text or ""

    def prompt(handle: Any) -> list[int]:
        if given is not None:
            return list(given)
        ids = list(handle.tokenize(text))
        if not ids:
            raise bad_request("the prompt is empty after tokenization", param="prompt")
        return ids

    return await _start(node, entry, req.options, prompt, started)


async def _start(
    node: Node,
    entry: ModelEntry,
    options: GenerationOptions,
    prompt: Callable[[Any], list[int]],
    started: float,
) -> list[GenerationStream]:
    """Count the request in flight, admit it on the device (503 ``queue_full`` at
    ``max_queue`` requests in progress), and in one worker job build its prompt, check the
    context, create its ``n`` generations and queue them on the scheduler. From then on the
    first stream owns the request: its ``close()`` gives back the admission and the in-flight
    count (the others' only let their generations go). The other choices follow the first on
    the device: each joins once the first has evaluated the prompt, and reuses its KV."""
    handle = _handle(entry)
    _check_capabilities(entry, handle, options)
    entry.begin_request()
    node.metrics.series(node.metrics.in_flight, entry.id).inc()
    try:
        admission = entry.worker.admit()
    except Exception as exc:
        _end(node, entry)
        raise worker_api_error(exc, entry) from None
    loop = asyncio.get_running_loop()
    built: list[GenerationStream] = []

    def job() -> list[GenerationStream]:
        ids = prompt(handle)
        max_tokens = check_context(
            entry, len(ids), options.max_tokens, clamp=options.clamp_max_tokens
        )
        leader: GenerationStream | None = None
        for index in range(options.n):
            stream = GenerationStream(
                node, entry, ids, options, max_tokens, started, sampling=_choice(options, index)
            )
            if leader is None:
                stream.start_on_worker(handle, loop, admission=admission)
                leader = stream
            else:
                stream.start_on_worker(handle, loop, follows=leader)
            built.append(stream)
        return built

    try:
        return await run_on_worker(entry, job, internal=True)
    except BaseException:
        if built:  # queued, but the request failed or was cancelled before it heard so
            for stream in built:
                stream.cancelled = True
                stream.close()
        else:
            admission.release()
            _end(node, entry)
        raise


def _check_capabilities(entry: ModelEntry, handle: Any, options: GenerationOptions) -> None:
    """A 400 naming the parameter when the request needs what the model's harness cannot do
    (log-probabilities, structured output): refused, never silently ignored."""
    capabilities = capabilities_of(handle)
    needs = [
        (options.sampling.logprobs is not None, LOGPROBS, "logprobs", "report log probabilities"),
        (
            options.sampling.response_format is not None,
            STRUCTURED_OUTPUT,
            "response_format",
            "enforce a response format (structured output)",
        ),
    ]
    for asked, capability, param, what in needs:
        if asked and capability not in capabilities:
            raise ApiError(
                400,
                "unsupported_parameter",
                f"{entry.id} is served by a harness ({entry.harness}) that cannot {what}",
                param=param,
            )


def _choice(options: GenerationOptions, index: int) -> SamplingParams:
    """Choice ``index``'s sampling: the request's, with a seed of its own (seed + index), so n
    seeded choices are reproducible and still differ."""
    sampling = options.sampling
    if index == 0 or sampling.seed is None:
        return sampling
    return attrs.evolve(sampling, seed=sampling.seed + index)


def _end(node: Node, entry: ModelEntry) -> None:
    entry.end_request()
    node.metrics.series(node.metrics.in_flight, entry.id).dec()


__all__ = [
    "accepted_parts",
    "check_context",
    "ready_entry",
    "render_prompt",
    "start_chat",
    "start_completion",
]
