"""The event-loop side of a generation: a stream of text deltas, limits and finish reasons.

A request's first worker job renders its prompt and adds its generation to the device's
scheduler (``cortex.neuron.scheduler``), which steps it together with every other running
generation of the model and hands its tokens back, already detokenised, through the worker's
outbox (one hand-off per scheduler iteration for all streams). :class:`GenerationStream`
receives them here: :meth:`GenerationStream.delta_batches` yields one list of text deltas per
hand-off, which a streaming response writes in one send (one frame per token, one socket write
per batch). The first list is the first token alone whenever the event loop keeps up, so time to
first token is never delayed by batching.

Stop strings are matched here (never emitted, held back across deltas); the scheduler enforces
``max_tokens`` and EOS. A stream that stops (a stop string, a client that left) sets its
sequence's ``cancelled`` flag: the next iteration closes the generation, freeing its KV cache,
and tokens it made after the stop are neither sent nor counted.

Everything above token ids lives here and in the scheduler, identical for every harness:
detokenisation that never emits half a character, stop strings, ``max_tokens``, finish reasons
``stop``/``length``, usage and timing metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from cortex.harness import (
    ConstraintError,
    DeviceFault,
    DeviceOutOfMemory,
    HarnessError,
    PromptError,
    SamplingParams,
)
from cortex.logging import NEURON_REQUEST_LOGGER
from cortex.neuron.models import ModelEntry
from cortex.neuron.node import Node
from cortex.neuron.requests import GenerationOptions
from cortex.neuron.scheduler import LENGTH, STOP, Output, Sequence, TokenLogprob
from cortex.neuron.textstream import IncrementalDecoder, StopMatcher
from cortex.neuron.workers import Admission, DevicePoisonedError, WorkerError
from cortex.wire.errors import ApiError

log = logging.getLogger(__name__)
request_log = logging.getLogger(NEURON_REQUEST_LOGGER)

__all__ = ["LENGTH", "STOP", "GenerationStream", "run_on_worker", "worker_api_error"]


def worker_api_error(exc: BaseException, entry: ModelEntry) -> ApiError:
    """Map what a worker job raised to the client's error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DevicePoisonedError):
        return ApiError(503, "device_poisoned", str(exc), retry_after=60)
    if isinstance(exc, WorkerError):
        return ApiError(
            503, "queue_full", f"{exc}; retry shortly", retry_after=2, error_type="overloaded_error"
        )
    if isinstance(exc, ConstraintError):
        return ApiError(400, "invalid_response_format", str(exc), param=exc.param)
    if isinstance(exc, PromptError):
        return ApiError(400, "invalid_prompt", str(exc))
    if isinstance(exc, DeviceOutOfMemory):
        return ApiError(503, "device_out_of_memory", str(exc), retry_after=10)
    if isinstance(exc, DeviceFault):
        return ApiError(503, "device_poisoned", f"device {entry.device} fault: {exc}")
    if isinstance(exc, HarnessError):
        return ApiError(500, "generation_failed", f"{entry.id}: {exc}")
    log.error("generation on %s failed", entry.id, exc_info=exc)
    return ApiError(500, "generation_failed", f"{entry.id}: {type(exc).__name__}: {exc}")


async def run_on_worker(entry: ModelEntry, fn: Any, *, internal: bool = False) -> Any:
    try:
        return await entry.worker.run(fn, internal=internal)
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise worker_api_error(exc, entry) from None
        raise


class GenerationStream:
    """One generation of one request: ``await start()``, iterate ``deltas()`` (or
    ``delta_batches()``, one list per hand-off from the scheduler), then read ``finish_reason``
    and usage. ``close()`` is idempotent and always releases the KV cache (at the scheduler's
    next iteration) and the request's place on the device."""

    def __init__(
        self,
        node: Node,
        entry: ModelEntry,
        prompt_ids: list[int],
        options: GenerationOptions,
        max_tokens: int,
        started_at: float,
        sampling: SamplingParams | None = None,
    ) -> None:
        self.node = node
        self.entry = entry
        self.prompt_ids = prompt_ids
        self.options = options
        # this choice's sampling (the request's, with a seed of its own for choices after the
        # first)
        self.sampling = sampling or options.sampling
        self.max_tokens = max_tokens
        self.started_at = started_at
        self.finish_reason: str | None = None
        # The stop string that ended generation (finish_reason "stop"), else None.
        self.stop_sequence: str | None = None
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self._closed = False
        self.cancelled = False
        # whether close() ends the request (the first choice's stream does)
        self.owns_request = True
        # With logprobs asked for: the log-probabilities of the tokens behind each text of the
        # last list delta_batches yielded (aligned with it), and those of tokens whose text is
        # still held back (they go with the next text).
        self.wants_logprobs = self.sampling.logprobs is not None
        self.batch_logprobs: list[list[TokenLogprob]] = []
        self._held_logprobs: list[TokenLogprob] = []
        # The scheduler's record of this generation (set on the worker by start_on_worker).
        self._sequence: Sequence | None = None
        # OutputSink: the event loop this stream lives on (set by admitted()), and what the
        # scheduler handed out that the stream has not consumed yet.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[Output] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        # This request's place on the device (start_admitted), given back by close().
        self._admission: Admission | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def start_on_worker(
        self,
        handle: Any,
        loop: asyncio.AbstractEventLoop,
        admission: Admission | None = None,
        follows: GenerationStream | None = None,
    ) -> None:
        """On the device worker, in the request's start job (``cortex.neuron.start``): create
        the generation and queue it on the device's scheduler, whose outputs come back on
        ``loop``. The request's first stream holds its ``admission`` (and its in-flight count)
        until :meth:`close`; another choice ``follows`` it on the device (it joins once the
        first has evaluated the prompt, and reuses that KV)."""
        generation = handle.start(self.prompt_ids, self.sampling)
        self._admission = admission
        self.owns_request = follows is None
        self.loop = loop
        self._sequence = Sequence(
            model=handle,
            generation=generation,
            decoder=IncrementalDecoder(handle.decode),
            prompt_tokens=len(self.prompt_ids),
            max_tokens=self.max_tokens,
            sink=self,
            max_batch=self.entry.max_batch,
            leader=follows._sequence if follows is not None else None,
        )
        self.entry.worker.scheduler.add(self._sequence)

    def deliver(self, output: Output) -> None:
        """OutputSink: the scheduler's next output (on the event loop, from the outbox). Outputs
        the stream has not taken yet merge, so it writes all of them in one send."""
        inbox = self._inbox
        if inbox and not inbox[-1].ended:
            last = inbox[-1]
            last.results.extend(output.results)
            last.finish, last.tail, last.error = output.finish, output.tail, output.error
        else:
            inbox.append(output)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next_output(self) -> Output:
        while not self._inbox:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._inbox.popleft()

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until EOS, a stop string or max_tokens, one at a time (the non-streaming
        paths); built on :meth:`delta_batches`."""
        batches = self.delta_batches()
        try:
            async for batch in batches:
                for text in batch:
                    yield text
        finally:
            await batches.aclose()

    async def delta_batches(self) -> AsyncGenerator[list[str], None]:
        """The text deltas of each hand-off from the scheduler, as one list (never empty): one
        delta per token that produced text, in order, exactly what :meth:`deltas` yields one by
        one. The last one (with ``finish_reason`` already set) also holds the tail the stop
        matcher or decoder held back. A streaming response writes one list in one send.
        Cancelling the consumer ends the generation at the next iteration."""
        stops = StopMatcher(self.options.stop)
        matching = bool(stops.stops)
        model = self.entry.id
        metrics = self.node.metrics
        tail = ""
        try:
            while self.finish_reason is None:
                output = await self._next_output()
                if self.first_token_at is None and output.results:
                    self.first_token_at = time.monotonic()
                    metrics.series(metrics.ttft, model).observe(
                        self.first_token_at - self.started_at
                    )
                texts: list[str] = []
                logprobs: list[list[TokenLogprob]] = []
                for result in output.results:
                    self.completion_tokens += 1
                    if result.logprob is not None:
                        self._held_logprobs.append(result.logprob)
                    text = result.text
                    if text and matching:
                        text = stops.feed(text)
                    if text:
                        texts.append(text)
                        if self.wants_logprobs:
                            logprobs.append(self._held_logprobs)
                            self._held_logprobs = []
                    if result.is_eos or stops.stopped:
                        self.finish_reason = STOP
                        self.stop_sequence = stops.matched
                        break
                self.batch_logprobs = logprobs
                if self.finish_reason is None:
                    if output.error is not None:
                        if texts:
                            yield texts
                        raise worker_api_error(output.error, self.entry)
                    if output.finish is not None:
                        self.finish_reason = output.finish
                        tail = output.tail
                if self.finish_reason is not None:
                    if not stops.stopped:
                        end = (stops.feed(tail) if tail else "") + stops.flush()
                        if end:
                            texts.append(end)
                            if self.wants_logprobs:
                                logprobs.append(self._held_logprobs)
                                self._held_logprobs = []
                    if texts:
                        # finish_reason is set: the consumer knows this list is the last one
                        yield texts
                    break
                if texts:
                    yield texts
        except BaseException:
            if self.finish_reason is None:
                self.cancelled = True
            raise
        finally:
            self._stop()

    def _stop(self) -> None:
        """No more tokens are wanted (the end, a stop string, an error, a consumer that left):
        the scheduler closes the generation at its next iteration if it still runs, which
        frees its KV cache. The request itself ends in :meth:`close`."""
        if self._sequence is not None:
            self._sequence.cancelled = True

    def close(self) -> None:
        """End the request, once, from its owner (the route for a whole answer, the streaming
        response's ``release`` for a stream): let the generation go (the scheduler closes it at
        its next iteration if it still runs, freeing its KV cache), give back its place on the
        device and its in-flight count, record metrics and the request log line. Never waits:
        it also runs while the request task is being cancelled."""
        if self._closed:
            return
        self._closed = True
        self._stop()
        if self._admission is not None:
            self._admission.release()
        model = self.entry.id
        metrics = self.node.metrics
        if self.owns_request:
            self.entry.end_request()
            metrics.series(metrics.in_flight, model).dec()
        metrics.series(metrics.prompt_tokens, model).inc(self.prompt_tokens)
        metrics.series(metrics.completion_tokens, model).inc(self.completion_tokens)
        reason = self.finish_reason or ("cancelled" if self.cancelled else "error")
        metrics.series(metrics.generations, model, reason).inc()
        request_log.info(
            "generation",
            extra={
                "fields": {
                    "model": model,
                    "device": self.entry.device,
                    "finish": reason,
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "ttft_s": round(self.first_token_at - self.started_at, 4)
                    if self.first_token_at is not None
                    else None,
                    "duration_s": round(time.monotonic() - self.started_at, 4),
                }
            },
        )
        if self.first_token_at is not None and self.completion_tokens > 1:
            decode_time = time.monotonic() - self.first_token_at
            if decode_time > 0:
                rate = (self.completion_tokens - 1) / decode_time
                metrics.series(metrics.tokens_per_second, model).observe(rate)
