"""A model served by vLLM's engine, behind cortex's batched contract.

The neuron's scheduler drives it like any batched harness; underneath, vLLM's own engine
(``LLMEngine``: ``add_request`` / ``step`` / ``abort_request``) schedules, pages the KV cache,
caches prefixes and samples:

* :meth:`VllmModel.admit` adds the generation to the engine (``add_request``), so it is
  scheduled from the next engine step on.
* :meth:`VllmModel.step_batch` runs **one engine step** per scheduler iteration. Every request
  that step produced a token for gets it; each row of the call then takes its generation's
  oldest token not yet handed out (a :class:`~cortex.harness.Step`), or ``None`` when vLLM made
  none for it in that step.
* :meth:`VllmGeneration.close` aborts the request (``abort_request``): vLLM frees its blocks at
  once.

**Prefill accounting.** vLLM chunks prefills itself (``max_num_batched_tokens``); the neuron's
token budget does not bind it. A generation reports its whole prompt as ``pending_tokens`` until
vLLM hands out its first token, then 1, so the neuron's scheduler and its metrics see it as
prefilling, and its budget (which vLLM ignores) only decides which prefilling rows it *asks*
about: a token vLLM makes for a row the scheduler did not include is kept and handed out at
that row's next call. The scheduler never waits on a row forever: each step_batch runs an
engine step, and vLLM makes progress on every request it holds at each step (it never preempts
here, because the neuron admits only what the KV cache holds, below).

**Capacity.** The engine's ``max_num_seqs`` is the load's ``max_batch``; its KV cache holds
the load's ``kv_tokens`` plus one block per sequence (``memory.py``). ``kv_tokens`` reported to
the scheduler and ``/models`` is vLLM's own: ``(num_blocks - max_batch) x block_size``, so the
reservations the scheduler admits always fit vLLM's blocks, partly filled last blocks included.

**Structured output and logprobs** use vLLM's own machinery: a ``response_format`` or tool
calls held to their schemas (``SamplingParams.tool_calls``) become a Lark grammar in
llguidance's dialect (:mod:`cortex.tool_grammar`, the grammar the torch harness enforces
itself), handed to vLLM as ``structured_outputs`` with its ``guidance`` backend (the engine is
started with it), so both harnesses hold an answer to the same grammar: compact JSON unless the
schema's ``x-guidance`` asks otherwise. The grammar is checked with llguidance when the
generation starts, so a schema it cannot enforce is the client's 400 naming the part, not an
engine error later. ``logprobs`` come from vLLM's sampler (``logprobs=k``: the chosen token's
and the k most likely, from the model's distribution before sampling).

**EOS and stopping.** The engine runs with ``ignore_eos`` and ``max_tokens`` at what the context
leaves: the neuron decides where a generation ends (EOS from the model's generation config and
tokenizer, as the torch harness reads them; ``max_tokens``; stop strings, matched on the event
loop), exactly as with the other harnesses. vLLM does not detokenize (``detokenize=False``):
the neuron does, once.

Every method runs on the device's worker thread (the neuron guarantees it), so nothing here locks.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cortex.chat_template import render_prompt
from cortex.harness import (
    LOGPROBS,
    STRUCTURED_OUTPUT,
    BatchRow,
    ConstraintError,
    HarnessError,
    PromptError,
    SamplingParams,
    Step,
    template_capabilities,
)
from cortex.tool_grammar import (
    compact_schema,
    response_format_schema,
    tool_call_grammar,
    tool_call_style,
)

log = logging.getLogger("cortex.harness.vllm")

_ids = itertools.count(1)


def eos_ids_of(generation_config: Any, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """Every token that ends a generation: the generation config's EOS ids, the model config's
    and the tokenizer's (what the torch harness uses, so both end at the same token)."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if value is None:
            return
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)

    if isinstance(generation_config, dict):
        add(generation_config.get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


class VllmModel:
    """A loaded model (implements :class:`cortex.harness.BatchedModel`)."""

    def __init__(
        self,
        *,
        engine: Any,
        path: Path,
        device_keys: Sequence[str],
        context_length: int,
        max_batch: int,
        memory_bytes: int,
        shutdown: Any = None,
    ) -> None:
        self._engine = engine
        self.path = path
        self.device_keys = tuple(device_keys)
        self.context_length = context_length
        self.tokenizer = engine.get_tokenizer()
        cache = engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.num_blocks = int(cache.num_gpu_blocks or 0)
        self.max_batch = max(1, int(engine.vllm_config.scheduler_config.max_num_seqs or max_batch))
        usable = (self.num_blocks - self.max_batch) * self.block_size
        # the KV cache always holds one context (vLLM refuses to start otherwise)
        self.kv_tokens = max(usable, min(self.num_blocks * self.block_size, context_length))
        model_config = engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        generation_config = _generation_config(model_config)
        self.eos_ids = eos_ids_of(generation_config, model_config.hf_config, self.tokenizer)
        template = getattr(self.tokenizer, "chat_template", None)
        self.capabilities = frozenset({LOGPROBS, STRUCTURED_OUTPUT}) | template_capabilities(
            template
        )
        if isinstance(template, dict):  # named templates: any of them may hold the tool syntax
            template = "\n".join(str(t) for t in template.values())
        self.tool_call_style = tool_call_style(template if isinstance(template, str) else None)
        self._memory_bytes = memory_bytes
        self._shutdown = shutdown
        self._running: dict[str, VllmGeneration] = {}
        self.steps = 0

    # ---------------------------------------------------------------- text <-> tokens

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        self._check_loaded()
        text = render_prompt(self.tokenizer, messages, tools)
        # the template already placed every special token (BOS included) where it belongs
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def tokenize(self, text: str) -> list[int]:
        self._check_loaded()
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        self._check_loaded()
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # ---------------------------------------------------------------- generation

    def start(self, prompt_ids: list[int], sampling: SamplingParams) -> VllmGeneration:
        self._check_loaded()
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise PromptError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                f"{self.context_length} tokens"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(
                f"token ids out of this model's vocabulary (0..{self.vocab_size - 1}): {bad[:5]}"
            )
        params = self._sampling_params(sampling, self.context_length - len(prompt_ids))
        return VllmGeneration(self, list(prompt_ids), params)

    def _sampling_params(self, sampling: SamplingParams, room: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        grammar = self.grammar_for(sampling)
        return VllmSamplingParams(
            n=1,
            temperature=max(0.0, float(sampling.temperature)),
            top_p=float(sampling.top_p),
            top_k=int(sampling.top_k) if sampling.top_k > 0 else 0,
            seed=sampling.seed,
            repetition_penalty=float(sampling.repetition_penalty),
            frequency_penalty=float(sampling.frequency_penalty),
            presence_penalty=float(sampling.presence_penalty),
            max_tokens=max(1, room),
            ignore_eos=True,
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
            logprobs=sampling.logprobs,
            structured_outputs=(
                StructuredOutputsParams(grammar=grammar) if grammar is not None else None
            ),
        )

    def grammar_for(self, sampling: SamplingParams) -> str | None:
        """The Lark grammar a generation decodes under (None when its request asked for no
        structured output), checked by llguidance now: a :class:`ConstraintError` (the
        client's 400 naming the part) when it cannot be enforced."""
        if sampling.response_format is None and sampling.tool_calls is None:
            return None
        param = "tools" if sampling.tool_calls is not None else "response_format"
        try:
            if sampling.tool_calls is not None:
                grammar = tool_call_grammar(
                    sampling.tool_calls, self.tool_call_style, sampling.response_format
                )
            else:
                assert sampling.response_format is not None
                schema = json.loads(response_format_schema(sampling.response_format))
                grammar = f"start: %json {compact_schema(schema)}\n"
        except ConstraintError:
            raise
        except ValueError as exc:
            raise ConstraintError(f"the JSON schema cannot be read: {exc}", param) from None
        import llguidance

        try:
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                llguidance.LLMatcher.grammar_from_lark(grammar)
            )
        except Exception as exc:  # an unreadable grammar
            raise ConstraintError(f"the JSON schema cannot be enforced: {exc}", param) from None
        if failed:  # (is_error, messages)
            raise ConstraintError(
                f"the JSON schema cannot be enforced: {'; '.join(messages)}", param
            )
        return grammar

    def admit(self, generation: VllmGeneration) -> None:  # type: ignore[override]
        """Hand the generation to vLLM's engine; it is scheduled from the next step on."""
        self._check_loaded()
        if generation.request_id is not None:
            return
        if generation.closed:
            raise HarnessError("admit() of a closed generation")
        if len(self._running) >= self.max_batch:
            raise HarnessError(f"{self.max_batch} generations already run (max_batch)")
        request_id = f"cortex-{next(_ids)}"
        self._engine.add_request(
            request_id, {"prompt_token_ids": generation.prompt}, generation.params
        )
        generation.request_id = request_id
        self._running[request_id] = generation

    def step_batch(self, rows: Sequence[BatchRow]) -> list[Step | None]:
        """One engine step; each row gets its generation's oldest token not yet handed out."""
        self._check_loaded()
        for generation, count in rows:
            if generation.request_id is None or generation.closed:  # type: ignore[attr-defined]
                raise HarnessError("step_batch() with a generation that is not running")
            if count < 1:
                raise HarnessError(f"step_batch() asked for {count} tokens")
        if self._running:
            self._collect(self._engine.step())
            self.steps += 1
        results: list[Step | None] = []
        for generation, _ in rows:
            results.append(generation.take())  # type: ignore[attr-defined]
        return results

    def _collect(self, outputs: Iterable[Any]) -> None:
        for output in outputs:
            generation = self._running.get(output.request_id)
            if generation is None:  # aborted meanwhile
                continue
            completion = output.outputs[0] if output.outputs else None
            if completion is not None:
                generation.received(
                    completion.token_ids, output.num_cached_tokens, completion.logprobs
                )
            if output.finished:
                generation.engine_finished = True
                self._running.pop(output.request_id, None)

    def _finish(self, generation: VllmGeneration) -> None:
        request_id = generation.request_id
        if request_id is None:
            return
        if self._running.pop(request_id, None) is not None and self._engine is not None:
            self._engine.abort_request([request_id])

    def reset(self) -> None:
        """Forget vLLM's prefix cache (running requests keep their blocks)."""
        self._check_loaded()
        try:
            self._engine.reset_prefix_cache()
        except Exception as exc:  # vLLM refuses while requests hold cached blocks
            log.info("vLLM did not reset its prefix cache: %s", exc)

    # ---------------------------------------------------------------- memory

    def memory_bytes(self) -> int:
        """The plan's bytes: weights, the KV cache vLLM allocated in full at start, overhead."""
        return 0 if self._engine is None else self._memory_bytes

    def unload(self) -> None:
        if self._engine is None:
            return
        for generation in list(self._running.values()):
            generation.close()
        engine, self._engine = self._engine, None
        if self._shutdown is not None:
            self._shutdown(engine)
        else:
            engine.engine_core.shutdown()

    def _check_loaded(self) -> None:
        if self._engine is None:
            raise HarnessError(f"{self.path.name} has been unloaded")


def with_logprobs(step: Step, entry: Any, top: int) -> Step:
    """``step`` with its token's log-probability and the ``top`` most likely tokens' from one
    position of vLLM's sample logprobs (token id -> ``Logprob(logprob, rank)``: the chosen
    token and the k most likely, ranked from 1)."""
    chosen = entry.get(step.token_id) if entry is not None else None
    if chosen is None:
        return step
    ranked = sorted(
        ((int(t), p) for t, p in entry.items() if p.rank is not None and p.rank <= top),
        key=lambda item: item[1].rank,
    )
    return Step(
        token_id=step.token_id,
        is_eos=step.is_eos,
        logprob=float(chosen.logprob),
        top_logprobs=tuple((t, float(p.logprob)) for t, p in ranked),
    )


def _generation_config(model_config: Any) -> dict[str, Any] | None:
    try:
        config = model_config.try_get_generation_config()
    except Exception:  # a missing or odd generation_config.json: use the other sources
        return None
    return config if isinstance(config, dict) else None


class VllmGeneration:
    """One generation (implements :class:`cortex.harness.BatchedGeneration`)."""

    def __init__(self, model: VllmModel, prompt: list[int], params: Any) -> None:
        self.model = model
        self.prompt = prompt
        self.params = params
        self.request_id: str | None = None
        self.tokens: collections.deque[Step] = collections.deque()
        self.produced = 0
        self.cached_tokens = 0
        self.engine_finished = False
        self.closed = False

    @property
    def pending_tokens(self) -> int:
        """The prompt until vLLM hands out the first token, then 1 (see the module docstring)."""
        return 1 if self.produced or self.tokens else len(self.prompt)

    def received(
        self, token_ids: Sequence[int], cached: int | None, logprobs: Sequence[Any] | None = None
    ) -> None:
        if not self.produced and not self.tokens and cached:
            self.cached_tokens = int(cached)
        eos_ids = self.model.eos_ids
        top = self.params.logprobs
        for index, token in enumerate(token_ids):
            token = int(token)
            step = Step(token_id=token, is_eos=token in eos_ids)
            if top is not None and logprobs is not None and index < len(logprobs):
                step = with_logprobs(step, logprobs[index], top)
            self.tokens.append(step)

    def take(self) -> Step | None:
        if self.tokens:
            self.produced += 1
            return self.tokens.popleft()
        if self.engine_finished:
            raise HarnessError(
                f"the context of {self.model.context_length} tokens is full (vLLM ended the "
                "request)"
            )
        return None

    def step(self) -> Step:
        """One token, this generation alone (the scheduler uses ``step_batch`` instead)."""
        if self.closed:
            raise HarnessError("this generation is closed")
        if self.request_id is None:
            self.model.admit(self)
        while True:
            step = self.model.step_batch([(self, max(1, self.pending_tokens))])[0]
            if step is not None:
                return step

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.model._finish(self)
        self.tokens.clear()
