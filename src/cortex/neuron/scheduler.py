"""The scheduler of one device: continuous batching, owned by the device's worker thread.

Every iteration (:meth:`Scheduler.step`) does, for each model on the device that has work:

1. **Leave**: generations whose client left (or whose stream hit a stop string) are closed,
   which frees their KV cache at once.
2. **Admit**: waiting generations join in arrival order while the model has room: fewer than
   ``max_batch`` running and, for a batched model, KV room for the prompt plus ``max_tokens``
   (its *reservation*). A generation that does not fit waits (head of line: a big request is
   not overtaken forever by small ones); a running one is never evicted to admit another, and
   never runs out of KV cache, because its whole reservation was counted when it joined.
3. **Step**: a :class:`~cortex.harness.BatchedModel` gets one ``step_batch`` call holding one
   decode token for every running generation and, within the iteration's token budget
   (``max_batch_tokens``), chunks of the prompts still being prefilled, oldest first; so a long
   prompt is prefilled over several iterations and never stalls the running streams for its
   whole length. A model that only implements the one-sequence contract has each running
   generation stepped once, one after another.
4. **Hand out**: each generation's new tokens (detokenised here, on the thread that owns the
   tokenizer), and its end (EOS, ``max_tokens``, an error) go back to its stream on the event
   loop; :class:`~cortex.neuron.workers.DeviceWorker` delivers them in one hand-off per
   iteration.

This follows vLLM's engine core (``add_request`` / ``step`` / ``abort_request``, a waiting and
a running queue, a per-step token budget shared by decodes and prefill chunks) rather than
TGI's padded ``CausalLMBatch`` (concatenate / filter of whole batches), because admitting and
releasing one row at a time is what keeps time to first token and inter-token latency flat
while users come and go. Unlike vLLM it never preempts: capacity is reserved at admission.

Nothing here locks: only the worker thread calls the scheduler, except for
:attr:`Sequence.cancelled`, a flag the event loop sets and the next iteration reads.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from cortex.harness import BatchedModel, DeviceFault, Generation, LoadedModel, Step, is_batched
from cortex.neuron.textstream import IncrementalDecoder

log = logging.getLogger(__name__)

WAITING = "waiting"
RUNNING = "running"
FINISHED = "finished"

STOP = "stop"
LENGTH = "length"

DEFAULT_MAX_BATCH_TOKENS = 512
# A prefill chunk gets at least this many tokens an iteration, even when the decode rows used
# up the budget, so a new prompt always makes progress.
MIN_PREFILL_CHUNK = 16


@attrs.define(slots=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives', with each
    token's text (decoded alone, here on the worker where the tokenizer lives)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@attrs.define(slots=True)
class StepResult:
    """One generated token: its id, whether it is EOS, the text it completes, and (when the
    request asked for them) its log-probabilities."""

    token_id: int
    is_eos: bool
    text: str
    logprob: TokenLogprob | None = None


@attrs.define(slots=True)
class Output:
    """What one generation got from the iterations since its last hand-off: its tokens, and
    how it ended (``finish`` is ``stop`` at EOS or ``length`` at ``max_tokens``; ``tail`` is the
    text the decoder held back then), or the error that ended it."""

    results: list[StepResult] = attrs.field(factory=list)
    finish: str | None = None
    tail: str = ""
    error: BaseException | None = None

    @property
    def ended(self) -> bool:
        return self.finish is not None or self.error is not None


class OutputSink(Protocol):
    """The event-loop side of a generation (``GenerationStream``): where its outputs go."""

    loop: Any

    def deliver(self, output: Output) -> None:
        """Called on the event loop's thread."""
        ...


@attrs.define(eq=False)
class Sequence:
    """One admitted request's generation, as the scheduler tracks it."""

    model: LoadedModel
    generation: Generation
    decoder: IncrementalDecoder
    prompt_tokens: int
    max_tokens: int
    sink: OutputSink
    # the load's max_batch, for a model that does not batch itself (a batched model says its
    # own); None: the device's default
    max_batch: int | None = None
    # another choice of the same request and prompt: this one joins once the leader evaluated
    # the prompt, so it reuses that KV instead of evaluating the prompt again
    leader: Sequence | None = None
    produced: int = 0
    state: str = WAITING
    # Set by the event loop when the stream no longer wants tokens (client left, stop string);
    # read (and acted on) by the next iteration.
    cancelled: bool = False

    @property
    def reservation(self) -> int:
        """KV positions this generation may fill: its prompt and every token it may make."""
        return self.prompt_tokens + self.max_tokens


@attrs.frozen
class ModelLoad:
    """What ``/models`` and ``/metrics`` show of one model's share of its device."""

    running: int = 0
    waiting: int = 0
    max_batch: int = 0
    kv_tokens: int | None = None
    kv_tokens_reserved: int = 0
    batched: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "waiting": self.waiting,
            "max_batch": self.max_batch,
            "batched": self.batched,
            "kv_tokens": self.kv_tokens,
            "kv_tokens_reserved": self.kv_tokens_reserved,
        }


class ModelLane:
    """The queues of one model on the device: a FIFO of waiting generations, the running ones,
    and the KV positions they reserved."""

    def __init__(self, model: LoadedModel, max_batch: int) -> None:
        self.model = model
        self.batched = is_batched(model)
        if self.batched:
            batched: BatchedModel = model  # type: ignore[assignment]
            self.max_batch = max(1, int(batched.max_batch))
            self.kv_tokens: int | None = int(batched.kv_tokens)
        else:
            self.max_batch = max(1, max_batch)
            self.kv_tokens = None
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.kv_reserved = 0

    def load(self) -> ModelLoad:
        return ModelLoad(
            running=len(self.running),
            waiting=len(self.waiting),
            max_batch=self.max_batch,
            kv_tokens=self.kv_tokens,
            kv_tokens_reserved=self.kv_reserved,
            batched=self.batched,
        )

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def fits(self, sequence: Sequence) -> bool:
        if len(self.running) >= self.max_batch:
            return False
        if self.kv_tokens is None:
            return True
        # a reservation over the whole cache runs alone (the context check keeps it within
        # the context, and the cache holds at least one context)
        needed = min(sequence.reservation, self.kv_tokens)
        return self.kv_reserved + needed <= self.kv_tokens

    def reserve(self, sequence: Sequence) -> None:
        if self.kv_tokens is not None:
            self.kv_reserved += min(sequence.reservation, self.kv_tokens)

    def release(self, sequence: Sequence) -> None:
        if self.kv_tokens is not None:
            self.kv_reserved -= min(sequence.reservation, self.kv_tokens)


Delivery = tuple[Sequence, Output]


class Scheduler:
    """Continuous batching for every model of one device. Only the worker thread calls it."""

    def __init__(
        self,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        default_max_batch: int = 32,
    ) -> None:
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.default_max_batch = default_max_batch
        self._lanes: dict[int, ModelLane] = {}
        self.iterations = 0
        # per iteration: rows stepped (a histogram in /metrics reads these through a callback)
        self.on_batch: Callable[[int], None] | None = None

    # ---- requests -------------------------------------------------------------------------

    def add(self, sequence: Sequence) -> None:
        """Queue a generation; it joins the model's batch at an iteration that has room."""
        lane = self._lanes.get(id(sequence.model))
        if lane is None:
            lane = self._lanes[id(sequence.model)] = ModelLane(
                sequence.model, sequence.max_batch or self.default_max_batch
            )
        sequence.state = WAITING
        lane.waiting.append(sequence)

    @property
    def has_work(self) -> bool:
        return any(lane.has_work for lane in self._lanes.values())

    def load_of(self, model: LoadedModel | None, max_batch: int | None = None) -> ModelLoad:
        """What ``/models`` shows of a model (``max_batch``: its load's, for a model that does
        not batch itself)."""
        lane = self._lanes.get(id(model)) if model is not None else None
        if lane is None:
            if model is not None and is_batched(model):
                batched: BatchedModel = model  # type: ignore[assignment]
                return ModelLoad(
                    max_batch=int(batched.max_batch),
                    kv_tokens=int(batched.kv_tokens),
                    batched=True,
                )
            return ModelLoad(max_batch=max_batch or self.default_max_batch)
        return lane.load()

    # ---- the iteration --------------------------------------------------------------------

    def step(self) -> list[Delivery]:
        """One iteration over every model with work; returns what to hand to the streams.
        A :class:`~cortex.harness.DeviceFault` propagates (the worker poisons the device and
        fails everything with :meth:`fail_all`)."""
        out: list[Delivery] = []
        for key, lane in list(self._lanes.items()):
            self._leave(lane)
            self._admit(lane, out)
            if lane.running:
                if lane.batched:
                    self._step_batched(lane, out)
                else:
                    self._step_one_by_one(lane, out)
            if not lane.has_work:
                del self._lanes[key]
        self.iterations += 1
        return out

    def _leave(self, lane: ModelLane) -> None:
        if any(s.cancelled for s in lane.running):
            keep = []
            for sequence in lane.running:
                if sequence.cancelled:
                    self._close(lane, sequence)
                else:
                    keep.append(sequence)
            lane.running = keep
        if any(s.cancelled for s in lane.waiting):
            lane.waiting = collections.deque(s for s in lane.waiting if not s.cancelled)

    def _admit(self, lane: ModelLane, out: list[Delivery]) -> None:
        while lane.waiting and lane.fits(lane.waiting[0]):
            leader = lane.waiting[0].leader
            if leader is not None and leader.state == RUNNING and leader.produced == 0:
                break  # its leader's prompt is still being evaluated: join next iteration
            sequence = lane.waiting.popleft()
            if sequence.max_tokens <= 0:
                self._finish(lane, sequence, Output(finish=LENGTH), out, running=False)
                continue
            try:
                if lane.batched:
                    lane.model.admit(sequence.generation)  # type: ignore[attr-defined]
            except DeviceFault:
                raise
            except Exception as exc:
                self._finish(lane, sequence, Output(error=exc), out, running=False)
                continue
            lane.reserve(sequence)
            sequence.state = RUNNING
            lane.running.append(sequence)

    def _step_batched(self, lane: ModelLane, out: list[Delivery]) -> None:
        rows: list[tuple[Any, int]] = []
        stepped: list[Sequence] = []
        prefilling: list[Sequence] = []
        for sequence in lane.running:
            pending = sequence.generation.pending_tokens  # type: ignore[attr-defined]
            if pending <= 1:
                rows.append((sequence.generation, 1))
                stepped.append(sequence)
            else:
                prefilling.append(sequence)
        budget = max(self.max_batch_tokens - len(rows), MIN_PREFILL_CHUNK)
        for sequence in prefilling:  # oldest first: lane.running keeps admission order
            if budget <= 0:
                break
            pending = sequence.generation.pending_tokens  # type: ignore[attr-defined]
            chunk = min(pending, budget)
            budget -= chunk
            rows.append((sequence.generation, chunk))
            stepped.append(sequence)
        if self.on_batch is not None:
            self.on_batch(len(rows))
        try:
            steps = lane.model.step_batch(rows)  # type: ignore[attr-defined]
        except DeviceFault:
            raise
        except Exception as exc:
            for sequence in stepped:
                self._end(lane, sequence, Output(error=exc), out)
            lane.running = [s for s in lane.running if s.state == RUNNING]
            return
        finished = False
        for sequence, step in zip(stepped, steps, strict=True):
            if step is not None:
                finished |= self._emit(lane, sequence, step, out)
        if finished:
            lane.running = [s for s in lane.running if s.state == RUNNING]

    def _step_one_by_one(self, lane: ModelLane, out: list[Delivery]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(lane.running))
        finished = False
        for sequence in lane.running:
            try:
                step = sequence.generation.step()
            except DeviceFault:
                raise
            except Exception as exc:
                self._end(lane, sequence, Output(error=exc), out)
                finished = True
                continue
            finished |= self._emit(lane, sequence, step, out)
        if finished:
            lane.running = [s for s in lane.running if s.state == RUNNING]

    def _emit(self, lane: ModelLane, sequence: Sequence, step: Step, out: list[Delivery]) -> bool:
        """Record one token; returns whether the generation ended with it."""
        sequence.produced += 1
        if step.is_eos:
            result = StepResult(step.token_id, True, sequence.decoder.flush())
            self._end(lane, sequence, Output([result], finish=STOP), out)
            return True
        result = StepResult(step.token_id, False, sequence.decoder.push(step.token_id))
        if step.logprob is not None:  # the end token is not part of the answer: none for it
            decode = sequence.model.decode
            result.logprob = TokenLogprob(
                decode([step.token_id]),
                step.logprob,
                [(decode([token]), value) for token, value in step.top_logprobs],
            )
        if sequence.produced >= sequence.max_tokens:
            output = Output([result], finish=LENGTH, tail=sequence.decoder.flush())
            self._end(lane, sequence, output, out)
            return True
        out.append((sequence, Output([result])))
        return False

    def _end(
        self, lane: ModelLane, sequence: Sequence, output: Output, out: list[Delivery]
    ) -> None:
        """A running generation ended: free its KV now and hand out its last output."""
        self._finish(lane, sequence, output, out, running=True)

    def _finish(
        self,
        lane: ModelLane,
        sequence: Sequence,
        output: Output,
        out: list[Delivery],
        running: bool,
    ) -> None:
        if running:
            self._close(lane, sequence)
        else:
            sequence.state = FINISHED
            _close_quietly(sequence.generation)
        out.append((sequence, output))

    def _close(self, lane: ModelLane, sequence: Sequence) -> None:
        sequence.state = FINISHED
        lane.release(sequence)
        _close_quietly(sequence.generation)

    # ---- whole-device events ------------------------------------------------------------

    def drop_model(self, model: LoadedModel, error: BaseException) -> list[Delivery]:
        """The model is being unloaded: end its generations with ``error``."""
        lane = self._lanes.pop(id(model), None)
        if lane is None:
            return []
        return self._fail_lane(lane, error)

    def fail_all(self, error: BaseException, close: bool = True) -> list[Delivery]:
        """End every generation with ``error`` (worker stopping; a poisoned device, where
        ``close`` is False: nothing may touch a broken device context any more)."""
        out: list[Delivery] = []
        for lane in self._lanes.values():
            out.extend(self._fail_lane(lane, error, close))
        self._lanes.clear()
        return out

    def _fail_lane(
        self, lane: ModelLane, error: BaseException, close: bool = True
    ) -> list[Delivery]:
        out: list[Delivery] = []
        for sequence in _all(lane.running, lane.waiting):
            sequence.state = FINISHED
            if close:
                _close_quietly(sequence.generation)
            if not sequence.cancelled:
                out.append((sequence, Output(error=error)))
        lane.running.clear()
        lane.waiting.clear()
        lane.kv_reserved = 0
        return out


def _all(*groups: Iterable[Sequence]) -> list[Sequence]:
    return [s for group in groups for s in group]


def _close_quietly(generation: Generation) -> None:
    """Release a generation's KV cache; a failure to do so must not take others down."""
    try:
        generation.close()
    except DeviceFault:
        raise
    except Exception:
        log.exception("closing a generation failed")
