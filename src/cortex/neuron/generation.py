"""The step loop: decode jobs on the device worker, text deltas out, limits and finish reasons.

A decode job runs steps (step + incremental decode) on the device worker and hands the tokens
back in one future. One token per job costs two cross-thread hand-offs per token (event loop ->
worker -> event loop), which dominated a fast model's step; so a job keeps stepping while it is
alone on the device: it stops after ``MAX_STEPS_PER_JOB`` tokens, after ``JOB_TIME_BUDGET_S``
of stepping, at EOS, at ``max_tokens``, or as soon as another job is waiting on the worker (so
two streams on one device still take turns: a turn is one token once both have a job queued,
at most ``MAX_STEPS_PER_JOB`` tokens / ``JOB_TIME_BUDGET_S`` otherwise). The first job of a
generation runs one step (the prefill), so time to first token is never delayed by batching.

The next job is queued as soon as a job's tokens arrive on the event loop, before they are
handed out (one job ahead, never past ``max_tokens``, EOS or a stop string): the device steps on
while the event loop turns the tokens into frames and writes them, instead of idling for that
time on every job. :meth:`GenerationStream.delta_batches` hands out one list of text deltas per
job, which a streaming response writes in one send (one frame per token, one socket write per
job). A request whose client left stops: the job queued ahead is dropped if it has not started,
otherwise generation ends with it (at most ``MAX_STEPS_PER_JOB`` tokens, or one step past
``JOB_TIME_BUDGET_S``, none of them counted or sent), and the KV cache is released on the
worker.

Everything above token ids lives here, identical for every harness: detokenisation that never
emits half a character, stop strings (never emitted, held back across deltas), ``max_tokens``,
finish reasons ``stop``/``length``, usage and timing metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs

from cortex.harness import DeviceFault, DeviceOutOfMemory, Generation, HarnessError, PromptError
from cortex.logging import NEURON_REQUEST_LOGGER
from cortex.neuron.models import READY, ModelEntry
from cortex.neuron.node import Node
from cortex.neuron.requests import GenerationOptions
from cortex.neuron.textstream import IncrementalDecoder, StopMatcher
from cortex.neuron.workers import Admission, DevicePoisonedError, WorkerError
from cortex.wire.errors import ApiError, model_not_found

log = logging.getLogger(__name__)
request_log = logging.getLogger(NEURON_REQUEST_LOGGER)

STOP = "stop"
LENGTH = "length"

# A decode job stops after this many tokens ... (the time budget below is the bound that
# matters; 64 rather than 16 made a 0.1 ms-a-token model stream 9-13% faster: docs/neuron.md)
MAX_STEPS_PER_JOB = 64
# ... or once it has stepped this long (a slow model runs one step per job, as before).
JOB_TIME_BUDGET_S = 0.004


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


def _drop_job(future: asyncio.Future[Any]) -> None:
    """Forget a queued job: it does not run if it has not started (the worker skips cancelled
    futures); a result or error that already arrived is discarded."""
    if not future.cancel() and not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


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


async def run_on_worker(entry: ModelEntry, fn: Any, *, internal: bool = False) -> Any:
    try:
        return await entry.worker.run(fn, internal=internal)
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise worker_api_error(exc, entry) from None
        raise


async def start_admitted(
    entry: ModelEntry, build: Callable[[], GenerationStream]
) -> GenerationStream:
    """Admit one generation request on the model's device (503 ``queue_full`` at
    ``max_queue`` requests in progress) and run ``build`` as its first worker job: it creates
    the stream and starts it there (:meth:`GenerationStream.start_on_worker`). The stream
    holds the admission until it is closed, and its later jobs are never refused, so an
    answer that started is never cut because other requests filled the device."""
    try:
        admission = entry.worker.admit()
    except Exception as exc:
        raise worker_api_error(exc, entry) from None
    built: list[GenerationStream] = []

    def job() -> GenerationStream:
        stream = build()
        stream.hold(admission)
        built.append(stream)
        return stream

    try:
        return await run_on_worker(entry, job, internal=True)  # type: ignore[no-any-return]
    except BaseException:
        if built:  # started, but the request was cancelled before it heard so
            built[0].cancelled = True
            built[0].close()
        admission.release()
        raise


def check_context(
    entry: ModelEntry, prompt_tokens: int, max_tokens: int | None, clamp: bool = False
) -> int:
    """The effective max_tokens, or 400 ``context_length_exceeded`` naming both numbers.

    ``clamp`` (the ``cortex.clamp_max_tokens`` request extension, set by the gateway on the
    Anthropic and Responses routes) turns a budget larger than the context left into that
    context: Claude Code asks for 32000 tokens whatever the model, and Anthropic's API treats
    max_tokens as a ceiling. OpenAI chat keeps the 400 the OpenAI spec requires."""
    context = entry.context_length or 0
    if clamp and max_tokens is not None and prompt_tokens < context:
        max_tokens = min(max_tokens, context - prompt_tokens)
    if max_tokens is None:
        if prompt_tokens >= context:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"the prompt has {prompt_tokens} tokens but the model's context is {context} "
                "tokens; shorten the prompt",
                param="messages",
            )
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


@attrs.define
class StepResult:
    token_id: int
    is_eos: bool
    text: str


@attrs.define
class StepBatch:
    """What one decode job produced. ``error`` is what a later step of the job raised after
    earlier steps succeeded: those tokens are still delivered, then the error, as if each step
    had been its own job."""

    results: list[StepResult]
    error: Exception | None = None


class GenerationStream:
    """One generation of one request: ``await start()``, iterate ``deltas()`` (or
    ``delta_batches()``, one list per decode job), then read ``finish_reason`` and usage.
    ``close()`` is idempotent and always releases the KV cache."""

    def __init__(
        self,
        node: Node,
        entry: ModelEntry,
        prompt_ids: list[int],
        options: GenerationOptions,
        max_tokens: int,
        started_at: float,
    ) -> None:
        self.node = node
        self.entry = entry
        self.prompt_ids = prompt_ids
        self.options = options
        self.max_tokens = max_tokens
        self.started_at = started_at
        self.finish_reason: str | None = None
        # The stop string that ended generation (finish_reason "stop"), else None.
        self.stop_sequence: str | None = None
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self._generation: Generation | None = None
        self._decoder: IncrementalDecoder | None = None
        self._closed = False
        self.cancelled = False
        # The prefill, queued by prefill_ahead() before the response starts (see there).
        self._first_job: asyncio.Future[StepBatch] | None = None
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

    async def start(self) -> None:
        """Admit the request and start the generation (see :func:`start_admitted`)."""
        handle = self.entry.handle
        if handle is None:
            raise ApiError(503, "model_unloading", f"{self.entry.id} is being unloaded")

        def build() -> GenerationStream:
            self.start_on_worker(handle)
            return self

        await start_admitted(self.entry, build)

    def hold(self, admission: Admission) -> None:
        """Keep the request's admission until :meth:`close`."""
        self._admission = admission

    def prefill_ahead(self) -> None:
        """Queue the first job (the prefill) now, before the caller writes the response head
        and the role frame, so the device prefills while the event loop writes instead of
        idling for those writes (one or two socket writes: ~0.2 ms each on a loopback VM).
        Its tokens and errors reach the client exactly as before: through
        :meth:`delta_batches`, which takes this job as its first. A refused submit (queue full,
        unloaded) is left for :meth:`delta_batches` to raise at the same point as before."""
        if (
            self._first_job is None
            and self._generation is not None
            and not self._closed
            and self.max_tokens > 0
        ):
            with contextlib.suppress(ApiError):
                self._first_job = self._submit_steps()

    def start_on_worker(self, handle: Any) -> None:
        """:meth:`start`'s work, on the device worker thread: a request that has more to do
        there first (render the chat template, tokenise) runs it in the same job (one
        hand-off instead of two)."""
        self._decoder = IncrementalDecoder(handle.decode)
        self._generation = handle.start(self.prompt_ids, self.options.sampling)

    def _steps_job(self, limit: int) -> StepBatch:
        """Up to ``limit`` steps on the worker thread (see the module docstring for when it
        stops early). A device fault propagates at once: the worker must poison the device."""
        generation, decoder, worker = self._generation, self._decoder, self.entry.worker
        if generation is None or decoder is None:  # closed while this job was queued ahead
            return StepBatch([])
        results: list[StepResult] = []
        deadline = time.perf_counter() + JOB_TIME_BUDGET_S
        while True:
            try:
                step = generation.step()
                if step.is_eos:
                    results.append(StepResult(step.token_id, True, decoder.flush()))
                    break
                results.append(StepResult(step.token_id, False, decoder.push(step.token_id)))
            except DeviceFault:
                raise
            except Exception as exc:
                if not results:
                    raise
                return StepBatch(results, exc)
            if len(results) >= limit or worker.has_waiting_jobs or time.perf_counter() >= deadline:
                break
        return StepBatch(results)

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

    async def delta_batches(self) -> AsyncIterator[list[str]]:
        """The text deltas of each decode job, as one list per job (never empty): one delta
        per token that produced text, in order, exactly what :meth:`deltas` yields one by one.
        The first list is the prefill's token alone, so time to first token is unchanged; the
        last one (with ``finish_reason`` already set) also holds the tail the stop matcher or
        decoder held back. A streaming response writes one list in one send. Cancelling the
        consumer stops it before the next job."""
        stops = StopMatcher(self.options.stop)
        matching = bool(stops.stops)
        model = self.entry.id
        metrics = self.node.metrics
        pending: list[str] = []
        # The next decode job, queued as soon as this one's tokens arrived (before they are
        # handed out and written), so the device steps on while the event loop writes.
        ahead, self._first_job = self._first_job, None
        try:
            while self.completion_tokens < self.max_tokens:
                job = ahead if ahead is not None else self._submit_steps()
                ahead = None
                try:
                    batch: StepBatch = await job
                except Exception as exc:
                    raise worker_api_error(exc, self.entry) from None
                if self.first_token_at is None:
                    prefill = True
                    self.first_token_at = time.monotonic()
                    metrics.series(metrics.ttft, model).observe(
                        self.first_token_at - self.started_at
                    )
                else:
                    prefill = False
                texts: list[str] = []
                finished = False
                for result in batch.results:
                    self.completion_tokens += 1
                    text = result.text
                    if text and matching:
                        text = stops.feed(text)
                    if text:
                        texts.append(text)
                    if result.is_eos or stops.stopped:
                        self.finish_reason = STOP
                        self.stop_sequence = stops.matched
                        finished = True
                        break
                if finished:
                    pending = texts  # the end's tail joins this job's deltas
                    break
                if batch.error is not None:
                    if texts:
                        yield texts
                    raise worker_api_error(batch.error, self.entry)
                if self.completion_tokens >= self.max_tokens:
                    if not prefill:
                        pending = texts  # the last job: the held tail (one flush) joins it
                        continue
                else:
                    # a refused submit (queue full, unloaded) is raised by the next turn,
                    # after these tokens went out
                    with contextlib.suppress(ApiError):
                        ahead = self._submit_steps()
                if texts:
                    yield texts
            else:
                self.finish_reason = LENGTH
            if not stops.stopped:
                held = ""
                if self.finish_reason == LENGTH and self._decoder is not None:
                    held = await run_on_worker(self.entry, self._decoder.flush, internal=True)
                tail = (stops.feed(held) if held else "") + stops.flush()
                if tail:
                    pending.append(tail)
            if pending:
                # finish_reason is set: the consumer knows this list is the last one
                yield pending
        except BaseException:
            if self.finish_reason is None:
                self.cancelled = True
            raise
        finally:
            if ahead is not None:
                _drop_job(ahead)
            self.close()

    def _submit_steps(self) -> asyncio.Future[StepBatch]:
        """Queue the next decode job: the prefill alone first (so batching never delays the
        first token), then up to ``MAX_STEPS_PER_JOB`` steps within ``max_tokens``."""
        # an unload lets running requests finish (up to its bound); once it took the model
        # away, the generation cannot go on
        if self.entry.handle is None:
            raise ApiError(
                503,
                "model_unloading",
                f"{self.entry.id} was unloaded during the generation",
                retry_after=5,
            )
        limit = (
            1
            if self.first_token_at is None
            else min(MAX_STEPS_PER_JOB, self.max_tokens - self.completion_tokens)
        )
        try:
            # internal: the request was admitted at its start; its next job is never refused
            return self.entry.worker.submit(
                functools.partial(self._steps_job, limit), internal=True
            )
        except Exception as exc:
            raise worker_api_error(exc, self.entry) from None

    def close(self) -> None:
        """Release the generation on its worker (without waiting: this also runs when the
        request task is being cancelled) and record metrics. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._first_job is not None:  # delta_batches never ran
            _drop_job(self._first_job)
            self._first_job = None
        generation, self._generation = self._generation, None
        if generation is not None:
            # poisoned or stopped: nothing left to release
            with contextlib.suppress(WorkerError):
                self.entry.worker.submit(generation.close, internal=True)
        if self._admission is not None:
            self._admission.release()
        model = self.entry.id
        metrics = self.node.metrics
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
