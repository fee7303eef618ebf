"""A transformers model resident on one device, and its one-sequence generations.

:class:`TorchModel` holds what every transformers model shares (tokenizer, chat template, EOS
ids, memory); its generations are our own prefill/decode loop over a ``DynamicCache``, one
sequence at a time. The harness serves models through its batched subclass
(``cortex_harness_torch.batched``); this one-sequence path remains for architectures the
batched KV cache cannot drive (the load-time check decides), and as the reference the batched
path is tested against.

Errors are sorted here, where the torch types are known: an out-of-memory is
:class:`DeviceOutOfMemory` (the device is fine, try later), any other CUDA/accelerator error is
:class:`DeviceFault` (the context may be broken: the worker is poisoned), anything else propagates.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from cortex.chat_template import AnswerDecoder
from cortex.harness import (
    LOGPROBS,
    STRUCTURED_OUTPUT,
    DeviceFault,
    DeviceOutOfMemory,
    Generation,
    HarnessError,
    PromptError,
    SamplingParams,
    Step,
    template_capabilities,
)
from cortex.tool_grammar import tool_call_style
from cortex_harness_torch.chat import render_prompt
from cortex_harness_torch.constraints import GrammarTokenizer, JsonConstraint
from cortex_harness_torch.sampling import TokenSampler, step_of

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def classify_torch_error(exc: BaseException) -> BaseException:
    """Map a torch exception to the harness contract's error types (or return it unchanged)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return DeviceOutOfMemory(f"device out of memory: {str(exc).splitlines()[0]}")
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if (accelerator_error is not None and isinstance(exc, accelerator_error)) or (
        isinstance(exc, RuntimeError) and ("CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc))
    ):
        return DeviceFault(f"device fault: {str(exc).splitlines()[0]}")
    return exc


def guarded(call: Callable[[], T]) -> T:
    """Run ``call``; re-raise torch device errors as the contract's types."""
    try:
        return call()
    except (DeviceFault, HarnessError):
        raise
    except Exception as exc:
        mapped = classify_torch_error(exc)
        if mapped is exc:
            raise
        raise mapped from exc


def eos_ids_of(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token that ends a generation: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()

    def add(value: int | Iterable[int] | None) -> None:
        if value is None:
            return
        if isinstance(value, int):
            ids.add(value)
        else:
            ids.update(int(v) for v in value)

    generation_config = getattr(model, "generation_config", None)
    add(getattr(generation_config, "eos_token_id", None))
    add(getattr(model.config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


def cache_argument_of(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever forward takes."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class TorchGeneration:
    """One generation: prefill on the first ``step``, then one decode step per call."""

    def __init__(self, owner: TorchModel, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self._owner = owner
        self._prompt_ids = list(prompt_ids)
        self._sampler = TokenSampler(
            sampling, self._prompt_ids, owner.vocab_size, owner.torch_device
        )
        self._constraint = owner.constraint_for(sampling)
        self._cache: Any = None
        self._last: int | None = None
        self.closed = False

    def step(self) -> Step:
        if self.closed:
            raise HarnessError("step() on a closed generation")
        step = guarded(self._forward)
        self._sampler.observe(step.token_id)
        self._last = step.token_id
        return step

    def _forward(self) -> Step:
        import torch
        from transformers import DynamicCache

        owner = self._owner
        with torch.inference_mode():
            if self._cache is None:
                self._cache = DynamicCache(config=owner.model.config)
                ids = self._prompt_ids
            else:
                assert self._last is not None, "a step after the first has a last token"
                ids = [self._last]
            input_ids = torch.tensor([ids], dtype=torch.long, device=owner.torch_device)
            output = owner.model(
                input_ids=input_ids,
                use_cache=True,
                logits_to_keep=1,
                **{owner.cache_argument: self._cache},
            )
            logits = output.logits[0, -1]
            constraint = self._constraint
            token = self._sampler.choose(logits if constraint is None else constraint.mask(logits))
            if constraint is not None:
                constraint.accept(token)
            return step_of(token, logits, self._sampler.params.logprobs, owner.eos_ids)

    def close(self) -> None:
        self.closed = True
        self._cache = None


class TorchModel:
    """A loaded model + tokenizer. All methods run on the owning device worker thread."""

    def __init__(
        self, model: Any, tokenizer: Any, torch_device: torch.device, context_length: int
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.torch_device = torch_device
        self.context_length = context_length
        self.eos_ids = eos_ids_of(model, tokenizer)
        self.cache_argument = cache_argument_of(model)
        template = getattr(tokenizer, "chat_template", None)
        self.capabilities = frozenset({LOGPROBS, STRUCTURED_OUTPUT}) | template_capabilities(
            template
        )
        if isinstance(template, dict):  # named templates: any of them may hold the tool syntax
            template = "\n".join(str(t) for t in template.values())
        self.tool_call_style = tool_call_style(template if isinstance(template, str) else None)
        self._decoder = AnswerDecoder(tokenizer)
        self._grammar_tokenizer: GrammarTokenizer | None = None
        output_embeddings = model.get_output_embeddings()
        self.vocab_size = int(
            output_embeddings.weight.shape[0]
            if output_embeddings is not None
            else model.config.vocab_size
        )

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        text = render_prompt(self.tokenizer, messages, tools)
        # the template already placed every special token (BOS included) where it belongs
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        return self._decoder.decode(token_ids)

    def constraint_for(self, sampling: SamplingParams) -> JsonConstraint | None:
        """The grammar a generation decodes under, when its request asked for structured
        output (a :class:`ConstraintError` when the schema cannot be enforced)."""
        if sampling.response_format is None and sampling.tool_calls is None:
            return None
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = GrammarTokenizer(
                self.tokenizer, self.vocab_size, self.eos_ids
            )
        return JsonConstraint(
            self._grammar_tokenizer,
            sampling.response_format,
            sampling.tool_calls,
            self.tool_call_style,
            self._decoder.special_markers,
        )

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """A :class:`PromptError` (the client's 400) for an empty prompt or unknown token ids."""
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(
                f"token ids out of this model's vocabulary (0..{self.vocab_size - 1}): {bad[:5]}"
            )

    def start(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        self.check_prompt(prompt_ids)
        return TorchGeneration(self, prompt_ids, sampling)

    def reset(self) -> None:
        """Generations own their caches; what is left to drop is the allocator's cache."""
        release_device_cache(self.torch_device)

    def memory_bytes(self) -> int:
        return 0 if self.model is None else weight_bytes(self.model)

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
        gc.collect()
        release_device_cache(self.torch_device)


def weight_bytes(model: Any) -> int:
    """The bytes a loaded module's parameters and buffers hold."""
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def release_device_cache(torch_device: torch.device) -> None:
    """Give cached allocator blocks back to the driver (CUDA only; a no-op on CPU)."""
    import torch

    if torch_device.type == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(torch_device):
            torch.cuda.empty_cache()
