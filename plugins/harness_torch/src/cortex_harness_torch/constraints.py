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

import json
from typing import TYPE_CHECKING, Any

from cortex.harness import ConstraintError, ResponseFormat, ToolCallFormat
from cortex.tool_grammar import HERMES_CLOSE, HERMES_OPEN, ToolCallStyle, call_schema

if TYPE_CHECKING:
    import torch


def _json_schema(response_format: ResponseFormat) -> str:
    if response_format.type == "json_object":
        return json.dumps({"type": "object"})
    if response_format.type == "json_schema" and response_format.schema is not None:
        return response_format.schema
    raise ConstraintError(f"response_format {response_format.type!r} cannot be enforced")


_COMPACT: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions (a TypedDict)


def _compact(schema: dict[str, Any]) -> str:
    """A schema for llguidance's ``%json``, compact JSON unless it asks otherwise."""
    return json.dumps({**schema, "x-guidance": {**_COMPACT, **schema.get("x-guidance", {})}})


def _lark_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lark string literal


def tool_call_grammar(
    tool_calls: ToolCallFormat, style: ToolCallStyle | None, text: ResponseFormat | None
) -> str:
    """The Lark grammar (llguidance's dialect) of an answer with tool calls in ``style``;
    ``text``: the format the answer must follow when it is not a call."""
    if style is None:
        raise ConstraintError(
            "this model's chat template writes tool calls in no syntax cortex can hold to a "
            "schema (it knows <tool_call> blocks and Llama 3 JSON calls)",
            param="tool_choice" if tool_calls.required else "tools",
        )
    try:
        call = _compact(call_schema(tool_calls, style))
        answer = _compact(json.loads(_json_schema(text))) if text is not None else None
    except ValueError as exc:
        raise ConstraintError(
            f"a tool's parameters are not a JSON Schema: {exc}", param="tools"
        ) from None
    free = "answer" if answer else "FREE"
    rules = [f"call: %json {call}"]
    if answer:
        rules.append(f"answer: %json {answer}")
    if style == "hermes":
        opener, close = _lark_literal(HERMES_OPEN), _lark_literal(HERMES_CLOSE)
        more = f'("\\n" {opener} call {close})*'
        if tool_calls.required:
            rules.insert(0, f"start: {opener} call {close} {more}")
        else:
            # free text that never writes the marker, or text up to the marker, then calls
            marker = HERMES_OPEN.strip()
            rules.insert(0, f"start: {free} | lead calls")
            rules.append(f"lead[stop={_lark_literal(marker)}]: /(?s:.*)/")
            rules.append(f'calls: "\\n" call {close} {more}')
            if not answer:
                rules.append(f"FREE: /(?s:.*)/ & ~/(?s:.*{marker}.*)/")
    else:  # llama3_json: the whole answer is one call
        rules.insert(0, "start: call" if tool_calls.required else f"start: {free} | call")
        if not answer and not tool_calls.required:
            rules.append("FREE: /(?s:.*)/ & ~/(?s:\\s*\\{.*)/")
    return "\n".join(rules) + "\n"


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
                    _json_schema(response_format), defaults=_COMPACT
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


__all__ = ["GrammarTokenizer", "JsonConstraint", "tool_call_grammar"]
