"""Structured output for transformers models: a grammar that masks each step's logits.

A generation asked for JSON (``SamplingParams.response_format``) gets a
:class:`JsonConstraint`: before each token is chosen, the tokens that cannot continue valid JSON
(of the schema, when one is given) are masked out of the logits, and the chosen token advances
the grammar; once the JSON is complete only the end token is allowed. The engine is llguidance
(the Rust library vLLM and llama.cpp can also use): chosen by measurement over xgrammar on this
project's models, 144-173 against 106-113 us a token for a schema of three fields on a 800-token
vocabulary (docs/benchmarks.md), without xgrammar's dependencies (triton, tvm-ffi) that a CPU
node would carry for nothing. The mask is computed on the CPU; applying it is one ``masked_fill``
on the model's device.

Tool calls (``SamplingParams.tool_calls``: ``strict`` tools, ``tool_choice`` required or
named) get a Lark grammar in llguidance's dialect around the model's own tool-call syntax
(:mod:`cortex.tool_grammar`): with ``tool_choice`` auto the answer is free text that never
writes the call marker, or text up to the marker followed by calls whose JSON follows the
schemas; with a call required it is calls only.

One constraint per generation: in a batch each row keeps its own grammar state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cortex.harness import ConstraintError, ResponseFormat, ToolCallFormat
from cortex.tool_grammar import (
    JSON_COMPACT,
    ToolCallStyle,
    response_format_schema,
    tool_call_grammar,
)

if TYPE_CHECKING:
    import torch


class GrammarTokenizer:
    """llguidance's view of one model's tokenizer (built once per model, on first use)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(i for i in eos_ids if i < len(hf_tokenizer))
        self._built: Any = None

    def get(self) -> Any:
        if self._built is None:
            import llguidance.hf

            eos = self._eos[0] if len(self._eos) == 1 else self._eos or None
            self._built = llguidance.hf.from_tokenizer(
                self._hf, n_vocab=len(self._hf), eos_token=eos
            )
        return self._built


class JsonConstraint:
    """The grammar state of one generation (see the module docstring): JSON of
    ``response_format``, or an answer with ``tool_calls`` in the model's ``style``."""

    def __init__(
        self,
        tokenizer: GrammarTokenizer,
        response_format: ResponseFormat | None,
        tool_calls: ToolCallFormat | None = None,
        style: ToolCallStyle | None = None,
    ) -> None:
        import llguidance

        param = "tools" if tool_calls is not None else "response_format"
        try:
            if tool_calls is not None:
                grammar = llguidance.LLMatcher.grammar_from_lark(
                    tool_call_grammar(tool_calls, style, response_format)
                )
            elif response_format is not None:
                # compact JSON unless the schema asks otherwise (x-guidance): a small model
                # given free whitespace can spend its whole token budget on it
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    response_format_schema(response_format), defaults=JSON_COMPACT
                )
            else:
                raise ConstraintError("nothing to enforce")
        except ConstraintError:
            raise
        except Exception as exc:  # an unreadable or unsupported schema
            raise ConstraintError(f"the JSON schema cannot be enforced: {exc}", param) from None
        self._matcher = llguidance.LLMatcher(tokenizer.get(), grammar)
        if self._matcher.is_error():
            raise ConstraintError(
                f"the JSON schema cannot be enforced: {self._matcher.get_error()}", param
            )
        self._vocab = tokenizer.vocab_size
        self._words: Any = None
        self._shifts: Any = None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (one row) with every token the grammar does not allow now at -inf."""
        import torch

        words = self._matcher.compute_bitmask()  # little-endian 32-bit words, 1 = allowed
        bits = torch.frombuffer(bytearray(words), dtype=torch.int32)
        if self._shifts is None:
            self._shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> self._shifts) & 1).flatten().bool()
        full = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(allowed.shape[0], full.shape[0])
        full[:n] = allowed[:n]
        return logits.masked_fill(~full.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance the grammar by the chosen token."""
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token)


__all__ = ["GrammarTokenizer", "JsonConstraint"]
