"""Driving a device's scheduler directly, on the calling thread, for harness tests.

A harness author tests batching without a neuron: :func:`sequence` wraps a generation the way
the neuron does, :func:`drive` runs the real :class:`~cortex.neuron.scheduler.Scheduler`
iteration by iteration, adding requests at chosen iterations, and each :class:`Collector` keeps
what its generation was handed (tokens, finish, error)."""

from __future__ import annotations

from cortex.harness import LoadedModel, SamplingParams
from cortex.neuron.scheduler import Output, Scheduler, Sequence
from cortex.neuron.textstream import IncrementalDecoder

# Eight user messages of very different lengths, for batches whose rows join and leave at
# different iterations (the harness parity tests use them).
TEXTS = (
    "hello the cat",
    "a long story about the river and the mountain city in the cold winter night",
    "red",
    "the quick dog runs over the old bridge",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
    "green blue small large",
    "the bright sun and the dark moon sing together about the sea and the sky above",
    "new",
)


class Collector:
    """Stands in for a stream's event-loop side: keeps what the scheduler hands out."""

    loop = None

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None
        self.error: BaseException | None = None

    def deliver(self, output: Output) -> None:
        self.tokens.extend(r.token_id for r in output.results)
        self.text += "".join(r.text for r in output.results) + output.tail
        self.finish = output.finish or self.finish
        self.error = output.error or self.error


def sequence(
    model: LoadedModel, prompt: list[int], max_tokens: int, sampling: SamplingParams
) -> Sequence:
    """A request's generation as the scheduler takes it (its sink a :class:`Collector`)."""
    return Sequence(
        model=model,
        generation=model.start(prompt, sampling),
        decoder=IncrementalDecoder(model.decode),
        prompt_tokens=len(prompt),
        max_tokens=max_tokens,
        sink=Collector(),
    )


def collected(seq: Sequence) -> Collector:
    sink = seq.sink
    assert isinstance(sink, Collector)
    return sink


def drive(scheduler: Scheduler, arrivals: dict[int, list[Sequence]], limit: int = 5000) -> int:
    """Run iterations until every request ended, adding ``arrivals[i]`` before iteration
    ``i`` and handing each output to its sequence's sink; returns the iterations it took."""
    last_arrival = max(arrivals, default=0)
    for iteration in range(limit):
        for seq in arrivals.get(iteration, []):
            scheduler.add(seq)
        step(scheduler)
        if not scheduler.has_work and iteration >= last_arrival:
            return iteration + 1
    raise AssertionError(f"the scheduler still had work after {limit} iterations")


def step(scheduler: Scheduler) -> None:
    """One iteration, its outputs handed to their sinks."""
    for seq, output in scheduler.step():
        seq.sink.deliver(output)


__all__ = ["TEXTS", "Collector", "collected", "drive", "sequence", "step"]
