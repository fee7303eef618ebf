"""Tool calls held to their schemas in the llama.cpp harness: with a call required (``tool_choice``
``required`` or a named function) the random model writes ``<tool_call>`` blocks whose JSON
names the tool and validates against its schema; with ``auto`` the grammar waits for the call
marker (llama.cpp's lazy grammar), leaves text alone, and once the marker is written masks every
token that would break the call."""

from __future__ import annotations

import ctypes
import json
import re

import attrs
import pytest
from cortex_harness_llamacpp import native
from cortex_harness_llamacpp.harness import LlamaCppHarness
from cortex_harness_llamacpp.model import LlamaCppModel
from cortex_harness_llamacpp.sampling import build_sampler

from cortex.devices import cpu_device
from cortex.harness import ConstraintError, LoadOptions, SamplingParams, ToolCallFormat, ToolSchema
from cortex.testing.tiny_gguf import build_tiny_gguf_repo
from cortex.testing.tiny_models import build_tiny_model

pytest.importorskip("llama_cpp")
jsonschema = pytest.importorskip("jsonschema")

ZONE = {
    "type": "object",
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": ZONE, "strict": True}},
    {"type": "function", "function": {"name": "get_city", "parameters": CITY, "strict": True}},
]
BOTH = ToolCallFormat(
    (ToolSchema("get_time", json.dumps(ZONE)), ToolSchema("get_city", json.dumps(CITY)))
)
BLOCK = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """The tiny llama with a 1024-token context, as F16 GGUF (the tools' schemas go into the
    prompt, and the tiny tokenizer spends a token on nearly every JSON character)."""
    scratch = tmp_path_factory.mktemp("strict-tools")
    source = build_tiny_model(scratch / "llama", context_length=1024)
    repo = build_tiny_gguf_repo(scratch / "gguf", quants=("F16",), model_dir=source)
    options = LoadOptions(quant="F16", extra={"n_threads": 1, "flash_attn": "off"})
    loaded = LlamaCppHarness().load(repo, cpu_device(), options)
    assert isinstance(loaded, LlamaCppModel) and loaded.tool_call_style == "hermes"
    yield loaded
    loaded.unload()


def generate(model: LlamaCppModel, sampling: SamplingParams, n: int = 120) -> str:
    model.reset()
    prompt = model.render_chat([{"role": "user", "content": "Time?"}], TOOLS)
    generation = model.start(prompt, sampling)
    tokens = []
    try:
        for _ in range(n):
            step = generation.step()
            if step.is_eos:
                break
            tokens.append(step.token_id)
    finally:
        generation.close()
    return model.decode(tokens)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_required_call_follows_its_schema(model: LlamaCppModel, seed: int) -> None:
    text = generate(
        model,
        SamplingParams(temperature=1.0, seed=seed, tool_calls=attrs.evolve(BOTH, required=True)),
    )
    assert text.startswith("<tool_call>\n"), text
    calls = [json.loads(block) for block in BLOCK.findall(text)]
    assert calls, text
    for call in calls:
        schema = {"get_time": ZONE, "get_city": CITY}[call["name"]]
        jsonschema.validate(call["arguments"], schema)


def test_a_named_function_is_the_one_called(model: LlamaCppModel) -> None:
    only = ToolCallFormat((ToolSchema("get_city", json.dumps(CITY)),), required=True)
    text = generate(model, SamplingParams(temperature=1.0, seed=4, tool_calls=only))
    calls = [json.loads(block) for block in BLOCK.findall(text)]
    assert calls and all(c["name"] == "get_city" for c in calls), text
    assert all(c["arguments"]["city"] in ("Paris", "Oslo") for c in calls)


def _allowed(lib, sampler, model: LlamaCppModel) -> set[int]:
    """The token ids the sampler leaves possible over the whole vocabulary."""
    n = model.n_vocab
    data = (lib.llama_token_data * n)(*[lib.llama_token_data(i, 0.0, 0.0) for i in range(n)])
    array = lib.llama_token_data_array(data, n, -1, False)
    lib.llama_sampler_apply(sampler, ctypes.byref(array))
    return {data[i].id for i in range(array.size) if data[i].logit != float("-inf")}


def test_auto_waits_for_the_marker_then_holds_the_call(model: LlamaCppModel) -> None:
    lib = model._lib
    sampling = SamplingParams(temperature=0.0, tool_calls=BOTH)
    sampler = build_sampler(
        lib, model.n_vocab, sampling, [], 64, vocab=model._vocab, tool_style="hermes"
    )
    try:
        assert len(_allowed(lib, sampler, model)) == model.n_vocab  # text: anything goes
        written = 'Sure. <tool_call>\n{"name":"get_time","arguments":{"zone":'
        for token in native.tokenize(lib, model._vocab, written, False, False):
            lib.llama_sampler_accept(sampler, token)
        allowed = _allowed(lib, sampler, model)
        assert 0 < len(allowed) < model.n_vocab
        texts = {model.decode([t]) for t in allowed}
        assert all(re.fullmatch(r"\s*-?\d*", t) for t in texts if t), sorted(texts)[:20]
    finally:
        lib.llama_sampler_free(sampler)


def test_a_template_without_a_tool_syntax_cannot_require_a_call(model: LlamaCppModel) -> None:
    sampling = SamplingParams(tool_calls=attrs.evolve(BOTH, required=True))
    with pytest.raises(ConstraintError) as refused:  # no tool_style: the template has none
        build_sampler(model._lib, model.n_vocab, sampling, [], 64, vocab=model._vocab)
    assert refused.value.param == "tool_choice"


def test_integer_ranges_become_enums_and_unenforced_keywords_are_refused() -> None:
    """llama-cpp-python's JSON Schema converter ignores number bounds and some keywords: a
    small integer range is rewritten as the enum it means; the rest is a ConstraintError
    naming where it is, never an answer that silently does not validate."""
    from cortex_harness_llamacpp.sampling import enforceable

    nested = {"$defs": {"Age": {"type": "integer", "minimum": 0, "exclusiveMaximum": 4}}}
    assert enforceable(nested) == {"$defs": {"Age": {"enum": [0, 1, 2, 3]}}}
    for schema, where in [
        ({"type": "number", "maximum": 1.5}, "schema"),
        ({"type": "integer", "minimum": 0}, "schema"),  # unbounded above
        ({"type": "integer", "minimum": 0, "maximum": 10**6}, "schema"),
        ({"properties": {"tags": {"type": "array", "uniqueItems": True}}}, "tags.uniqueItems"),
        ({"not": {"type": "string"}}, "schema.not"),
    ]:
        with pytest.raises(ConstraintError) as refused:
            enforceable(schema)
        assert where in str(refused.value)
