"""Log-probabilities through a real neuron with the official ``openai`` SDK: chat
(``logprobs`` / ``top_logprobs``) and completions (``logprobs: k``), whole and streamed, from the
model's real distribution: each value equals transformers' ``log_softmax`` of the logits of that
step, computed here by running the model over the prompt and the tokens before it."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import httpx
import pytest

from tests.neuron.conftest import ECHO_REPLY, LiveNeuron

LLAMA = "huggingface:acme/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story about the river and the old bridge."}]


@pytest.fixture(scope="module")
def loaded(neuron: LiveNeuron) -> LiveNeuron:
    neuron.load("acme/tiny-llama")
    neuron.load("acme/echo")
    return neuron


def model_logprobs(
    model_dir: Path, prompt_ids: list[int], generated: list[int]
) -> list[list[float]]:
    """log_softmax of the logits at each generated position (the prompt, then the tokens
    before it), one forward pass over the whole sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = torch.tensor([prompt_ids + generated])
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return [log_probs[start + i].tolist() for i in range(len(generated))]


def greedy_ids(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_chat_logprobs_are_the_models_log_softmax(loaded: LiveNeuron, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    answer = loaded.openai().chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == answer.usage.completion_tokens == 12  # type: ignore[union-attr]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    prompt = prompt_ids(tiny_llama_dir)
    ids = greedy_ids(tiny_llama_dir, prompt, 12)  # the neuron's greedy tokens (parity tested)
    expected = model_logprobs(tiny_llama_dir, prompt, ids)
    assert [e.token for e in content] == [tokenizer.decode([t]) for t in ids]
    for entry, token, row in zip(content, ids, expected, strict=True):
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(max(row), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy picked the most likely
    assert "".join(e.token for e in content) == answer.choices[0].message.content


def test_streamed_chat_logprobs_equal_the_whole_answers(loaded: LiveNeuron) -> None:
    client = loaded.openai()
    common = {"model": LLAMA, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**common, logprobs=True, top_logprobs=2)  # type: ignore[call-overload]
    stream = client.chat.completions.create(**common, logprobs=True, top_logprobs=2, stream=True)  # type: ignore[call-overload]
    streamed = []
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(chunk.choices[0].logprobs.content)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    expected = whole.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [
        (e.token, round(e.logprob, 5)) for e in expected
    ]
    assert text == whole.choices[0].message.content


def test_without_logprobs_there_are_none(loaded: LiveNeuron) -> None:
    answer = loaded.openai().chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    assert answer.choices[0].logprobs is None


def test_completion_logprobs(loaded: LiveNeuron) -> None:
    client = loaded.openai()
    whole = client.completions.create(
        model=LLAMA, prompt="the river and the bridge", max_tokens=10, temperature=0, logprobs=2
    )
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 10  # type: ignore[arg-type]
    assert all(len(top) <= 2 and top for top in logprobs.top_logprobs)  # type: ignore[union-attr]
    assert "".join(logprobs.tokens) == whole.choices[0].text  # type: ignore[arg-type]
    offsets = logprobs.text_offset
    assert offsets is not None and offsets[0] == 0
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    streamed_tokens: list[str] = []
    for chunk in client.completions.create(
        model=LLAMA,
        prompt="the river and the bridge",
        max_tokens=10,
        temperature=0,
        logprobs=2,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed_tokens.extend(chunk.choices[0].logprobs.tokens or [])
    assert streamed_tokens == logprobs.tokens


def test_a_scripted_echo_token_is_certain(loaded: LiveNeuron) -> None:
    answer = loaded.openai().chat.completions.create(
        model="huggingface:acme/echo",
        messages=[{"role": "user", "content": "hi"}],
        logprobs=True,
        top_logprobs=5,
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "".join(e.token for e in content) == ECHO_REPLY
    assert all(e.logprob == 0.0 and len(e.top_logprobs) == 1 for e in content)
    assert math.exp(content[0].top_logprobs[0].logprob) == 1.0


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": 1, "top_logprobs": 1}, "top_logprobs"),
    ],
)
def test_bad_logprobs_values_are_a_400_naming_the_parameter(
    loaded: LiveNeuron, route: str, body: dict, param: str
) -> None:
    request = {"model": LLAMA, "max_tokens": 2, **body}
    if route == "/v1/chat/completions":
        request["messages"] = MESSAGES
    else:
        request["prompt"] = "hello"
    answer = httpx.post(f"{loaded.url}{route}", json=request, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
