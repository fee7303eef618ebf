"""The contract between the neuron and harness plugins.

A harness turns a fetched repo into a :class:`LoadedModel` on one device. Every method of a
loaded model and of a generation is called on that device's worker thread and nowhere else, so a
harness never needs locks and never sees two of its calls at once.

The device's scheduler (``cortex.neuron.scheduler``) drives generation in iterations. A model
that implements :class:`BatchedModel` is stepped once per iteration for all its running
generations together (:meth:`BatchedModel.step_batch`: chunks of prompts and one decode token
per running generation in one forward pass), which is what makes many concurrent users cost
little more than one. A model that implements only :class:`LoadedModel` still works: the
scheduler calls each running generation's :meth:`Generation.step` once per iteration, one after
another. Either way a cancelled generation leaves at the next iteration.

Everything above a token id (detokenisation, stop strings, max_tokens, usage, finish reasons, the
OpenAI wire format) lives in the neuron, so a harness only does what is specific to its library.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from cortex.devices import Device
from cortex.source import Preflight


@attrs.frozen
class LoadOptions:
    """What the load request and the model profile asked for. ``device_kind`` (``cpu``,
    ``cuda``) is the kind of device the load targets, so an estimate can account for the dtype
    the harness would use there (float32 on CPU, bf16 on CUDA)."""

    quant: str | None = None
    context_length: int | None = None
    device_kind: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)
    # Capacity of a batched model: at most ``max_batch`` generations run at once, and the KV
    # cache holds ``kv_tokens`` positions (None: :func:`default_kv_tokens`). A harness that
    # batches sizes its KV cache (and its memory estimate) from these.
    max_batch: int | None = None
    kv_tokens: int | None = None
    # A load over several devices of one node (docs/harnesses.md#several-devices-for-one-model):
    # every device it spans, the primary (whose worker runs it) first; empty for a one-device
    # load. Only a harness whose ``max_devices`` (an optional attribute, 1 when absent) allows
    # it is given more than one.
    devices: tuple[Device, ...] = ()


@attrs.frozen
class ResponseFormat:
    """Structured output a generation must follow: ``json_object`` (one JSON object) or
    ``json_schema`` (JSON that validates against ``schema``, a JSON Schema as JSON text). The
    harness enforces it while decoding (a constraint on each step's tokens), so even a model
    that would not produce it on its own does."""

    type: str
    schema: str | None = None


@attrs.frozen
class ToolSchema:
    """One tool a constrained generation may call: its name and the JSON Schema (JSON text)
    its arguments must validate against (``{"type": "object"}`` for a tool without ``strict``)."""

    name: str
    parameters: str


@attrs.frozen
class ToolCallFormat:
    """Tool calls a generation must write well-formed, in its model's own tool-call syntax:
    each call names one of ``tools`` and its arguments validate against that tool's schema.
    ``required``: the answer is tool calls only (``tool_choice`` ``required`` or a named
    function); otherwise the model may answer in text, and a call it starts is held to the
    schema (``strict: true`` tools). A harness that enforces it declares
    ``STRUCTURED_OUTPUT``."""

    tools: tuple[ToolSchema, ...]
    required: bool = False


@attrs.frozen
class SamplingParams:
    """Sampling for one generation; ``temperature == 0`` means greedy. ``logprobs`` asks each
    :class:`Step` for the log-probability of its token and of the ``logprobs`` most likely
    tokens (0 to 20); None asks for none (the harness may skip the work)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tool_calls: ToolCallFormat | None = None


@attrs.frozen
class Step:
    """One decode step: the token produced and whether it ends the generation (EOS).

    With ``SamplingParams.logprobs`` set, ``logprob`` is the token's log-probability and
    ``top_logprobs`` the most likely tokens with theirs, most likely first, both from the
    model's distribution at that step *before* sampling changed it (temperature, top-k/p,
    penalties), as vLLM reports by default."""

    token_id: int
    is_eos: bool = False
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


# What a loaded model can do beyond plain generation, declared as its optional attribute
# ``capabilities`` (a frozenset of these names): the neuron refuses a request that needs one the
# model lacks (a 400 naming the parameter, never silently ignored) and reports them in /models.
LOGPROBS = "logprobs"
STRUCTURED_OUTPUT = "structured_output"  # SamplingParams.response_format is enforced
CHAT = "chat"  # render_chat works (the model has a chat template)
EMBEDDINGS = "embeddings"  # embed() turns token ids into vectors (an EmbeddingModel)
TOOLS = "tools"  # the chat template renders tools (tool calls can be asked for)


class HarnessError(Exception):
    """A harness failure that is not a device fault (bad repo, unsupported model)."""


class PromptError(HarnessError):
    """The request cannot be turned into a prompt (e.g. the chat template refused the messages).
    The client's fault: the neuron answers 400, the model stays healthy."""


class ConstraintError(PromptError):
    """The requested output format cannot become a decoding constraint (a JSON Schema the
    engine cannot compile): the client's 400, naming the part (``param``)."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


class DeviceOutOfMemory(HarnessError):
    """The device ran out of memory for this load or generation. Not a fault: the device is
    still usable, so the neuron answers 503 with Retry-After and does not poison the worker."""


class DeviceFault(Exception):
    """A failure that leaves the device in an unknown state (e.g. a CUDA error).

    Raising it poisons the device worker: later jobs fail fast instead of touching a broken
    context.
    """


@runtime_checkable
class Generation(Protocol):
    """One in-progress generation holding its own KV cache."""

    def step(self) -> Step:
        """Produce the next token (the first call runs the prefill)."""
        ...

    def close(self) -> None:
        """Release the KV cache of this generation; called once, also after a cancel."""
        ...


@runtime_checkable
class LoadedModel(Protocol):
    """A model resident on one device."""

    context_length: int

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Apply the model's chat template and tokenize; returns prompt token ids."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Tokenize raw text for ``/v1/completions``."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Detokenize; the neuron calls it on growing prefixes to stream text safely."""
        ...

    def start(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        """Begin a generation; no work needs to happen before the first ``step``."""
        ...

    def reset(self) -> None:
        """Drop any cached KV state shared between generations."""
        ...

    def memory_bytes(self) -> int:
        """Memory this model holds on its device: what the node's memory ledger counts and
        eviction frees. A KV cache that grows with the running batch counts at its capacity
        (``kv_tokens``), so another model is never placed in room this one will need."""
        ...

    def unload(self) -> None:
        """Free everything (on CUDA, also the allocator's cache)."""
        ...


@runtime_checkable
class Harness(Protocol):
    """What ``cortex_register_harnesses`` registers."""

    @property
    def name(self) -> str:
        """The harness's name (``torch``, ``llamacpp``): what a load request names."""
        ...

    def accepts(self, preflight: Preflight) -> bool:
        """Whether this harness can load the repo preflight described (from its file list)."""
        ...

    def files_needed(self, preflight: Preflight) -> list[str]:
        """Which files a fetch must download for a load (config, tokenizer, weights)."""
        ...

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        """Bytes a load will need on the device, before anything is downloaded."""
        ...

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        """Load from a local snapshot directory onto ``device``; runs on its worker thread."""
        ...


@runtime_checkable
class BatchedGeneration(Generation, Protocol):
    """A generation of a :class:`BatchedModel`. ``pending_tokens`` is how many of its known
    tokens the KV cache does not hold yet: the prompt (less any prefix reused from a cache) once
    admitted, then 1 (the token just sampled). :meth:`Generation.step` must still work (one
    ``step_batch`` of this generation alone), but the scheduler does not call it."""

    @property
    def pending_tokens(self) -> int: ...


@runtime_checkable
class BatchedModel(LoadedModel, Protocol):
    """A model whose generations advance together, one forward pass per scheduler iteration.

    ``max_batch`` bounds the generations running at once and ``kv_tokens`` the positions its KV
    cache holds; the scheduler admits a generation only while both have room for its prompt plus
    its ``max_tokens`` (so a running generation is never evicted or starved), and makes the
    others wait in order.
    """

    max_batch: int
    kv_tokens: int

    def admit(self, generation: BatchedGeneration) -> None:
        """The scheduler admitted ``generation`` (it runs from the next ``step_batch`` on):
        claim its place in the KV cache and reuse a cached prefix of its prompt, lowering its
        ``pending_tokens``. Called once, before its first ``step_batch``."""
        ...

    def step_batch(self, rows: Sequence[BatchRow]) -> list[Step | None]:
        """One forward pass over ``rows``: for each ``(generation, n)``, evaluate the next ``n``
        (1 <= n <= ``pending_tokens``) of its pending tokens; when that evaluates all of them,
        sample its next token and answer its :class:`Step` (the token is then its one pending
        token), else ``None`` (a chunk of a long prompt). Each row samples with its own
        :class:`SamplingParams`. Raising fails every row of the call; a generation closed
        later frees its KV at once."""
        ...


@runtime_checkable
class EmbeddingModel(Protocol):
    """A loaded model that turns text into vectors (capability ``embeddings``). The neuron
    tokenises each input with the model's ``tokenize`` and calls :meth:`embed` once per request,
    on the device's worker thread."""

    dimensions: int

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One vector per input (token ids), as the model's pooling makes it (normalised when
        the model is meant to be compared by cosine)."""
        ...


BatchRow = tuple[BatchedGeneration, int]
"""One row of :meth:`BatchedModel.step_batch`: a generation and how many tokens to evaluate."""

# The KV cache a batched load reserves when the load request and the model profile name no
# ``kv_tokens``: enough for ``max_batch`` requests of ~1k tokens, and never less than one full
# context (or this cap of it): a 128k-context model is not given 128k x max_batch positions.
KV_TOKENS_PER_SEQUENCE = 1024
KV_CONTEXT_CAP = 8192
DEFAULT_MAX_BATCH = 32


def default_kv_tokens(context_length: int, max_batch: int) -> int:
    """KV positions for a batched load that names none: ``max_batch`` x 1024, at least one
    context of up to 8192 tokens, at most ``max_batch`` full contexts (more is never used)."""
    floor = min(context_length, KV_CONTEXT_CAP)
    return max(floor, min(max_batch * KV_TOKENS_PER_SEQUENCE, max_batch * context_length))


def capacity_of(context_length: int, options: LoadOptions) -> tuple[int, int]:
    """``(max_batch, kv_tokens)`` of a load: what the options ask for, else the defaults; the
    KV cache always holds at least one full context, so a request that fits the context alone
    can always run."""
    max_batch = options.max_batch or DEFAULT_MAX_BATCH
    kv_tokens = options.kv_tokens or default_kv_tokens(context_length, max_batch)
    return max_batch, max(kv_tokens, context_length)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share: what a harness can reuse of a cached
    sequence for a new prompt. Compares slices in C (a conversation that grew by a turn shares
    all of the shorter one: one comparison), bisecting otherwise."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    a, b = tuple(a[:n]), tuple(b[:n])  # like with like: a tuple never equals a list
    if a == b:
        return n
    low, high = 1, n  # a[:low] == b[:low] holds; a[:high] == b[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def template_capabilities(chat_template: Any) -> frozenset[str]:
    """What a chat template offers: ``chat`` when there is one, ``tools`` when it renders the
    ``tools`` it is given (a Jinja template that never mentions them would drop them)."""
    if not isinstance(chat_template, str) or not chat_template:
        return frozenset()
    return frozenset({CHAT, TOOLS}) if "tools" in chat_template else frozenset({CHAT})


def capabilities_of(model: LoadedModel | None) -> frozenset[str]:
    """The capabilities a loaded model declares (none when it declares nothing)."""
    declared = getattr(model, "capabilities", None)
    return frozenset(declared) if declared else frozenset()


def is_batched(model: LoadedModel) -> bool:
    """Whether the scheduler can step this model's generations together."""
    return callable(getattr(model, "step_batch", None)) and callable(getattr(model, "admit", None))


__all__ = [
    "CHAT",
    "DEFAULT_MAX_BATCH",
    "EMBEDDINGS",
    "LOGPROBS",
    "STRUCTURED_OUTPUT",
    "TOOLS",
    "BatchRow",
    "BatchedGeneration",
    "BatchedModel",
    "ConstraintError",
    "DeviceFault",
    "DeviceOutOfMemory",
    "EmbeddingModel",
    "Generation",
    "Harness",
    "HarnessError",
    "LoadOptions",
    "LoadedModel",
    "PromptError",
    "ResponseFormat",
    "SamplingParams",
    "Step",
    "ToolCallFormat",
    "ToolSchema",
    "capabilities_of",
    "capacity_of",
    "common_prefix",
    "default_kv_tokens",
    "is_batched",
    "template_capabilities",
]
