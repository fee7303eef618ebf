"""The ``echo`` harness: a model that needs no GPU and no weights.

A repo holding an ``echo.json`` is an echo model. It goes through exactly the paths a real model
takes (source preflight and fetch, neuron load on a device worker, step-sized generation, memory
accounting), but its "inference" is a scripted reply paced at a configured rate. That makes
gateway tests fast and deterministic, makes gateway benchmarks honest (the backend is never the
bottleneck unless told to be) and lets an operator smoke-test a fleet without a GPU.

``echo.json`` (every key optional)::

    {
      "reply": "text" | null,          # null: repeat the last user message (or the raw prompt)
      "tokens_per_second": 50.0 | null, # null: as fast as possible
      "memory_mb": 64,                  # what the model claims to hold on its device
      "context_length": 4096,
      "reasoning": "text" | null,       # emitted first as <think>text</think>
      "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
      "opens_think": false,             # the prompt ends in <think> (R1-style templates)
      "load_seconds": 0.0,              # a slow cold load (gateway keep-alive tests)
      "fail_after": null                # scripted fault: HarnessError after N tokens (0: at start)
    }

With ``opens_think`` the rendered prompt ends with ``<think>`` and the reply begins inside the
reasoning (``reasoning</think>answer``), as DeepSeek-R1 style models do. ``fail_after`` makes
generation fail like a broken model would: before any token (a 500 before the answer) or
mid-stream (an in-band error frame).

``tool_calls`` are emitted (as ``<tool_call>{"name", "arguments"}</tool_call>`` text, the format
the neuron's tool-call parser reads) only when the request offers tools and the last message is
from the user, so an agent loop that sends tool results back gets the plain reply and ends.

Tokens are words with their leading whitespace; the vocabulary grows as text is seen, so
``decode(tokenize(text)) == text`` for any text.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import attrs
import cattrs

from cortex.devices import Device
from cortex.harness import (
    CHAT,
    LOGPROBS,
    TOOLS,
    HarnessError,
    LoadedModel,
    LoadOptions,
    SamplingParams,
    Step,
)
from cortex.hookspecs import hookimpl
from cortex.source import Preflight

ECHO_FILE = "echo.json"
EOS_ID = 0
# Until the repo is fetched its declared size is unknown; a profile's memory_mb (or this) stands in.
ESTIMATE_BEFORE_FETCH = 16 * 2**20

_TOKEN = re.compile(r"\s*\S+|\s+")
_ROLE_MARKER = "<|{role}|>"


@attrs.frozen
class EchoToolCall:
    name: str
    arguments: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class EchoSpec:
    """The contents of ``echo.json``."""

    reply: str | None = None
    tokens_per_second: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    memory_mb: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    context_length: int = attrs.field(default=4096, validator=attrs.validators.gt(0))
    reasoning: str | None = None
    tool_calls: list[EchoToolCall] = attrs.field(factory=list)
    opens_think: bool = False
    load_seconds: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    fail_after: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )


SCRIPTED_FAILURE = "scripted failure (echo.json fail_after)"

_converter = cattrs.Converter(forbid_extra_keys=True)


def read_spec(path: Path) -> EchoSpec:
    """Parse ``echo.json``; a malformed file is a :class:`HarnessError` naming the problem."""
    try:
        data = json.loads(path.read_text())
        return _converter.structure(data, EchoSpec)
    except FileNotFoundError:
        raise HarnessError(f"{path}: missing (an echo repo needs {ECHO_FILE})") from None
    except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
        detail = "; ".join(str(e) for e in getattr(exc, "exceptions", [exc]))
        raise HarnessError(f"{path}: invalid {ECHO_FILE}: {detail}") from None


def _message_text(content: Any) -> str:
    """OpenAI content is a string or a list of parts; only text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", None)
        )
    return ""


class EchoGeneration:
    """Yields the scripted reply token by token, then EOS; paced by an absolute schedule so
    streams interleaved on one device worker do not slow each other down."""

    def __init__(
        self,
        reply_ids: list[int],
        tokens_per_second: float | None,
        fail_after: int | None = None,
        logprobs: int | None = None,
    ) -> None:
        self._ids = reply_ids
        self._fail_after = fail_after
        self._logprobs = logprobs
        self._interval = 1.0 / tokens_per_second if tokens_per_second else 0.0
        self._next = 0
        self._due: float | None = None
        self.closed = False

    def step(self) -> Step:
        if self._interval:
            now = time.monotonic()
            if self._due is None:
                self._due = now
            self._due += self._interval
            if self._due > now:
                time.sleep(self._due - now)
        if self._fail_after is not None and self._next >= self._fail_after:
            raise HarnessError(SCRIPTED_FAILURE)
        if self._next >= len(self._ids):
            return self._step(EOS_ID, is_eos=True)
        token = self._ids[self._next]
        self._next += 1
        return self._step(token)

    def _step(self, token: int, is_eos: bool = False) -> Step:
        """A scripted token is certain: log-probability 0, and no other token is possible (so
        the top list holds just that one, however many were asked for)."""
        if self._logprobs is None:
            return Step(token, is_eos=is_eos)
        top = ((token, 0.0),) if self._logprobs > 0 else ()
        return Step(token, is_eos=is_eos, logprob=0.0, top_logprobs=top)

    @property
    def tokens_produced(self) -> int:
        return self._next

    def close(self) -> None:
        self.closed = True


class EchoModel:
    """A loaded echo model: a growing vocabulary and the scripted behaviour of its spec."""

    # the echo "template" renders tools (its scripted tool calls answer them)
    capabilities = frozenset({LOGPROBS, CHAT, TOOLS})

    def __init__(self, spec: EchoSpec, context_length: int) -> None:
        self.spec = spec
        self.context_length = context_length
        self._pieces: list[str] = ["</s>"]
        self._ids: dict[str, int] = {"</s>": EOS_ID}
        self._special: set[int] = {EOS_ID}
        self.generations_started = 0

    # ---- vocabulary -------------------------------------------------------------------------

    def _id(self, piece: str, special: bool = False) -> int:
        token = self._ids.get(piece)
        if token is None:
            token = len(self._pieces)
            self._pieces.append(piece)
            self._ids[piece] = token
            if special:
                self._special.add(token)
        return token

    def _marker(self, role: str) -> int:
        return self._id(_ROLE_MARKER.format(role=role), special=True)

    def tokenize(self, text: str) -> list[int]:
        return [self._id(piece) for piece in _TOKEN.findall(text)]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(
            self._pieces[t]
            for t in token_ids
            if 0 <= t < len(self._pieces) and t not in self._special
        )

    # ---- prompts and generation -------------------------------------------------------------

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        ids: list[int] = []
        if tools:
            ids.append(self._marker("tools"))
        for message in messages:
            ids.append(self._marker(str(message.get("role", "user"))))
            ids.extend(self.tokenize(_message_text(message.get("content"))))
        ids.append(self._marker("assistant"))
        if self.spec.opens_think:
            ids.extend(self.tokenize("<think>"))
        return ids

    def _last_user_text(self, prompt_ids: list[int]) -> tuple[str, bool, bool]:
        """(text of the last user message or the whole prompt, tools offered, last is user)."""
        markers = {t: self._pieces[t] for t in set(prompt_ids) if t in self._special}
        if not markers:
            return self.decode(prompt_ids), False, True
        tools = self._marker("tools") in markers
        user, assistant = self._marker("user"), self._marker("assistant")
        starts = [i for i, t in enumerate(prompt_ids) if t in markers and t != assistant]
        if not starts:
            return "", tools, False
        last_start = starts[-1]
        last_is_user = prompt_ids[last_start] == user
        user_starts = [i for i in starts if prompt_ids[i] == user]
        if not user_starts:
            return "", tools, last_is_user
        begin = user_starts[-1] + 1
        end = begin
        while end < len(prompt_ids) and prompt_ids[end] not in markers:
            end += 1
        return self.decode(prompt_ids[begin:end]), tools, last_is_user

    def reply_text(self, prompt_ids: list[int]) -> str:
        """What this model answers to a prompt (public so tests can predict it)."""
        user_text, tools, last_is_user = self._last_user_text(prompt_ids)
        parts: list[str] = []
        if self.spec.opens_think:  # the prompt opened <think>: the model only closes it
            parts.append(f"{self.spec.reasoning or ''}</think>")
        elif self.spec.reasoning:
            parts.append(f"<think>{self.spec.reasoning}</think>")
        if self.spec.tool_calls and tools and last_is_user:
            for call in self.spec.tool_calls:
                payload = json.dumps({"name": call.name, "arguments": call.arguments})
                parts.append(f"<tool_call>{payload}</tool_call>")
            return "".join(parts)
        parts.append(self.spec.reply if self.spec.reply is not None else user_text)
        return "".join(parts)

    def start(self, prompt_ids: list[int], sampling: SamplingParams) -> EchoGeneration:
        self.generations_started += 1
        if self.spec.fail_after == 0:
            raise HarnessError(SCRIPTED_FAILURE)
        reply_ids = self.tokenize(self.reply_text(prompt_ids))
        return EchoGeneration(
            reply_ids, self.spec.tokens_per_second, self.spec.fail_after, sampling.logprobs
        )

    def reset(self) -> None:
        """No KV cache to drop."""

    def memory_bytes(self) -> int:
        return self.spec.memory_mb * 2**20

    def unload(self) -> None:
        self._pieces = self._pieces[:1]
        self._ids = {"</s>": EOS_ID}


@attrs.frozen
class EchoHarness:
    """Loads repos that contain ``echo.json``."""

    name: str = "echo"

    def accepts(self, preflight: Preflight) -> bool:
        return ECHO_FILE in preflight.file_names()

    def files_needed(self, preflight: Preflight) -> list[str]:
        return [ECHO_FILE]

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        return ESTIMATE_BEFORE_FETCH

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        spec = read_spec(Path(snapshot) / ECHO_FILE)
        if spec.load_seconds:
            time.sleep(spec.load_seconds)  # on the device worker, as a real load would block
        context = spec.context_length
        if options.context_length is not None:
            context = min(context, options.context_length)
        return EchoModel(spec, context)


def write_echo_repo(directory: Path, **spec: Any) -> Path:
    """Write an echo model repo (just ``echo.json``) into ``directory``; returns the directory."""
    _converter.structure(spec, EchoSpec)  # refuse a spec the harness would refuse
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ECHO_FILE).write_text(json.dumps(spec, indent=2))
    return directory


@hookimpl
def cortex_register_harnesses(register: Any) -> None:
    register(EchoHarness())
