"""A llama.cpp sampler chain for one generation, built from cortex's :class:`SamplingParams`.

Each generation owns its chain, so its random state (``seed``) and penalty history never leak into
another stream sharing the model. Penalties follow the semantics clients expect from vLLM and
transformers: ``repetition_penalty`` looks at prompt and output, ``frequency_penalty`` and
``presence_penalty`` at the output only (OpenAI's definition). Structured output is a grammar
sampler at the head of the chain (llama.cpp's GBNF, from the JSON Schema). Tool calls held to
their schemas (``SamplingParams.tool_calls``) are a grammar around the model's own call syntax
(:mod:`cortex.tool_grammar`): from the first token when a call is required, and lazily (from the
moment the model writes the call marker: llama.cpp's trigger patterns) when it may also answer
in text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cortex.harness import ConstraintError, ResponseFormat, SamplingParams, ToolCallFormat
from cortex.tool_grammar import HERMES_CLOSE, HERMES_OPEN, ToolCallStyle, call_schema

_UINT32 = 0xFFFFFFFF


def build_sampler(
    lib: Any,
    n_vocab: int,
    sampling: SamplingParams,
    prompt_ids: Sequence[int],
    history: int,
    vocab: Any = None,
    tool_style: ToolCallStyle | None = None,
) -> Any:
    """A ``llama_sampler`` chain; free it with ``llama_sampler_free``. ``history`` is how many
    recent tokens the penalties look at (the context length: the whole text). With a
    ``response_format``, a grammar sampler comes first (``vocab`` is the model's)."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if sampling.tool_calls is not None:
        grammar = _tool_call_sampler(lib, vocab, sampling, tool_style)
        if not grammar:
            lib.llama_sampler_free(chain)
            raise ConstraintError("llama.cpp could not compile the tools' grammar", "tools")
        lib.llama_sampler_chain_add(chain, grammar)
    elif sampling.response_format is not None:
        grammar = lib.llama_sampler_init_grammar(
            vocab, grammar_of(sampling.response_format).encode("utf-8"), b"root"
        )
        if not grammar:
            lib.llama_sampler_free(chain)
            raise ConstraintError("llama.cpp could not compile the grammar of the JSON schema")
        lib.llama_sampler_chain_add(chain, grammar)
    if sampling.repetition_penalty != 1.0:
        repetition = lib.llama_sampler_init_penalties(
            n_vocab, history, float(sampling.repetition_penalty), 0.0, 0.0
        )
        for token in prompt_ids:
            lib.llama_sampler_accept(repetition, token)
        lib.llama_sampler_chain_add(chain, repetition)
    if sampling.frequency_penalty != 0.0 or sampling.presence_penalty != 0.0:
        lib.llama_sampler_chain_add(
            chain,
            lib.llama_sampler_init_penalties(
                n_vocab,
                history,
                1.0,
                float(sampling.frequency_penalty),
                float(sampling.presence_penalty),
            ),
        )
    if sampling.temperature <= 0.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        return chain
    if sampling.top_k and sampling.top_k > 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(int(sampling.top_k)))
    if sampling.top_p < 1.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(float(sampling.top_p), 1))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(float(sampling.temperature)))
    seed = lib.LLAMA_DEFAULT_SEED if sampling.seed is None else int(sampling.seed) & _UINT32
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
    return chain


def _tool_call_sampler(
    lib: Any, vocab: Any, sampling: SamplingParams, style: ToolCallStyle | None
) -> Any:
    """A grammar sampler for ``sampling.tool_calls`` in ``style``: eager when a call is
    required, lazy (triggered by the call marker) when the model may answer in text."""
    import ctypes

    tool_calls = sampling.tool_calls
    assert tool_calls is not None
    if style is None:
        raise ConstraintError(
            "this model's chat template writes tool calls in no syntax cortex can hold to a "
            "schema (it knows <tool_call> blocks and Llama 3 JSON calls)",
            "tool_choice" if tool_calls.required else "tools",
        )
    if sampling.response_format is not None and not tool_calls.required:
        raise ConstraintError(
            "the llama.cpp harness holds either the answer's format or the tool calls to a "
            "schema, not both at once: drop response_format or make the call required",
            "response_format",
        )
    grammar = tool_call_gbnf(tool_calls, style).encode("utf-8")
    if tool_calls.required:
        return lib.llama_sampler_init_grammar(vocab, grammar, b"toolcalls")
    # the whole text so far must match; the grammar starts at the first group (the marker)
    pattern = r"[\s\S]*?(<tool_call>)[\s\S]*" if style == "hermes" else r"\s*(\{)[\s\S]*"
    patterns = (ctypes.c_char_p * 1)(pattern.encode("utf-8"))
    return lib.llama_sampler_init_grammar_lazy_patterns(
        vocab, grammar, b"toolcalls", patterns, 1, None, 0
    )


def tool_call_gbnf(tool_calls: ToolCallFormat, style: ToolCallStyle) -> str:
    """GBNF of tool calls in ``style`` (root rule ``toolcalls``): the JSON of one call is the
    JSON Schema converter's grammar (its ``root``)."""
    call = _gbnf_of_schema(call_schema(tool_calls, style), "tools")
    if style == "hermes":
        opener, close = json.dumps(HERMES_OPEN), json.dumps(HERMES_CLOSE)
        rule = f'toolcalls ::= {opener} root {close} ("\\n" {opener} root {close})*'
    else:
        rule = "toolcalls ::= root"
    return f"{rule}\n{call}"


# An integer range up to this many values becomes an enum the converter enforces.
MAX_INTEGER_RANGE = 1024
# Keywords llama-cpp-python's JSON Schema converter leaves unenforced: refused rather than
# silently ignored (an answer that does not validate is what the client asked not to get).
_UNENFORCED = (
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "minProperties",
    "maxProperties",
    "uniqueItems",
    "multipleOf",
    "contains",
    "patternProperties",
    "propertyNames",
)
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def enforceable(schema: Any, path: str = "schema") -> Any:
    """``schema`` as the converter can enforce it: a bounded integer range of at most
    :data:`MAX_INTEGER_RANGE` values becomes an ``enum``; any other bound on a number, and the
    keywords in ``_UNENFORCED``, are a :class:`ConstraintError` naming where they are."""
    if isinstance(schema, list):
        return [enforceable(item, f"{path}[{i}]") for i, item in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    for key in _UNENFORCED:
        if key in schema and not (key == "not" and schema[key] == {}):
            raise ConstraintError(
                f"{path}.{key}: the llama.cpp harness cannot enforce {key!r} "
                "(its JSON Schema converter ignores it)"
            )
    out = {
        key: value
        if key in ("enum", "const", "default", "examples")
        else enforceable(value, f"{path}.{key}")
        for key, value in schema.items()
    }
    if any(bound in out for bound in _BOUNDS):
        out = _integer_range_as_enum(out, path)
    return out


def _integer_range_as_enum(schema: dict[str, Any], path: str) -> dict[str, Any]:
    import math

    low = schema.get("minimum", -math.inf)
    high = schema.get("maximum", math.inf)
    if "exclusiveMinimum" in schema:
        low = max(low, schema["exclusiveMinimum"] + 1)
    if "exclusiveMaximum" in schema:
        high = min(high, schema["exclusiveMaximum"] - 1)
    if schema.get("type") != "integer" or not (
        math.isfinite(low) and math.isfinite(high) and high - low < MAX_INTEGER_RANGE
    ):
        raise ConstraintError(
            f"{path}: the llama.cpp harness enforces bounds only on integers, over at most "
            f"{MAX_INTEGER_RANGE} values (its JSON Schema converter ignores them otherwise)"
        )
    rest = {k: v for k, v in schema.items() if k not in (*_BOUNDS, "type")}
    return {**rest, "enum": list(range(math.ceil(low), math.floor(high) + 1))}


# llama-cpp-python's converter lets a JSON string take any character but ``"`` and ``\\``
# (``char``) and a pattern's ``.`` anything but a line break (``dot``): a raw control character
# or an unescaped quote there is not JSON, so a sampled answer could fail to parse. These are
# llama.cpp's own rules of today (control characters and DEL excluded); a pattern's ``.`` is
# held to one plain string character.
_JSON_CHAR = (
    r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F])"
)
_JSON_DOT = r'dot ::= [^"\\\x7F\x00-\x1F]'


def _json_safe(grammar: str) -> str:
    """``grammar`` with its ``char`` and ``dot`` rules replaced by ones that only write JSON."""
    lines = []
    for line in grammar.splitlines():
        if line.startswith("char ::= "):
            line = _JSON_CHAR
        elif line.startswith("dot ::= "):
            line = _JSON_DOT
        lines.append(line)
    return "\n".join(lines) + "\n"


def _gbnf_of_schema(schema: Any, param: str) -> str:
    from llama_cpp import llama_grammar

    try:
        return _json_safe(llama_grammar.json_schema_to_gbnf(json.dumps(enforceable(schema))))
    except ConstraintError as exc:
        raise ConstraintError(str(exc), param) from None
    except Exception as exc:  # the converter's own errors: an unsupported schema
        raise ConstraintError(f"the JSON schema cannot be enforced: {exc}", param) from None


def grammar_of(response_format: ResponseFormat) -> str:
    """The GBNF grammar of a response format: llama-cpp-python's JSON Schema converter (the
    llama.cpp project's), or its JSON grammar for any object."""
    from llama_cpp import llama_grammar

    if response_format.type == "json_object":
        return str(llama_grammar.JSON_GBNF)
    if response_format.type != "json_schema" or response_format.schema is None:
        raise ConstraintError(f"response_format {response_format.type!r} cannot be enforced")
    try:
        schema = json.loads(response_format.schema)
    except ValueError as exc:
        raise ConstraintError(f"the JSON schema is not JSON: {exc}") from None
    return _gbnf_of_schema(schema, "response_format")
