"""A llama.cpp sampler chain for one generation, built from cortex's :class:`SamplingParams`.

Each generation owns its chain, so its random state (``seed``) and penalty history never leak into
another stream sharing the model. Penalties follow the semantics clients expect from vLLM and
transformers: ``repetition_penalty`` looks at prompt and output, ``frequency_penalty`` and
``presence_penalty`` at the output only (OpenAI's definition). Structured output is a grammar
sampler at the head of the chain (llama.cpp's GBNF, from the JSON Schema).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cortex.harness import ConstraintError, ResponseFormat, SamplingParams

_UINT32 = 0xFFFFFFFF


def build_sampler(
    lib: Any,
    n_vocab: int,
    sampling: SamplingParams,
    prompt_ids: Sequence[int],
    history: int,
    vocab: Any = None,
) -> Any:
    """A ``llama_sampler`` chain; free it with ``llama_sampler_free``. ``history`` is how many
    recent tokens the penalties look at (the context length: the whole text). With a
    ``response_format``, a grammar sampler comes first (``vocab`` is the model's)."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if sampling.response_format is not None:
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


def grammar_of(response_format: ResponseFormat) -> str:
    """The GBNF grammar of a response format: llama-cpp-python's JSON Schema converter (the
    llama.cpp project's), or its JSON grammar for any object."""
    from llama_cpp import llama_grammar

    if response_format.type == "json_object":
        return str(llama_grammar.JSON_GBNF)
    if response_format.type != "json_schema" or response_format.schema is None:
        raise ConstraintError(f"response_format {response_format.type!r} cannot be enforced")
    try:
        return str(llama_grammar.json_schema_to_gbnf(response_format.schema))
    except Exception as exc:  # the converter's own errors: an unsupported schema
        raise ConstraintError(f"the JSON schema cannot be enforced: {exc}") from None
