"""Incremental detokenisation and stop strings, against a real BPE tokenizer."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.neuron.textstream import REPLACEMENT, IncrementalDecoder, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)


@pytest.mark.parametrize(
    "text", ["the quick cat runs", "café 東京 🙂 naïve", "漢字 Жф 😀🎉 and ✨", "mixed: Ελληνικά!"]
)
def test_streamed_deltas_rebuild_the_text_and_never_split_a_character(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert all(REPLACEMENT not in d for d in deltas)


def test_characters_split_over_byte_tokens_are_held_back(tokenizer) -> None:
    """Characters the tokenizer never saw are several byte-level tokens each; the decoder
    emits nothing until a character is complete."""
    text = "漢字😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(t))
    deltas = [decoder.push(i) for i in ids]
    assert "" in deltas
    assert "".join(deltas) == text
    assert all(REPLACEMENT not in d for d in deltas)


def test_flush_emits_an_unfinished_character_at_the_end(tokenizer) -> None:
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(t))
    if len(ids) > 1:
        assert decoder.push(ids[0]) == ""
        assert decoder.flush() == tokenizer.decode(ids[:1])


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    out += matcher.flush()
    return out, matcher.stopped


def test_stop_string_across_pieces_is_caught_and_not_emitted() -> None:
    assert run_matcher(["STOP"], ["hello ST", "O", "P world"]) == ("hello ", True)
    assert run_matcher(["ab", "b"], ["xab"]) == ("x", True)
    assert run_matcher(["end"], ["the e", "n"]) == ("the en", False)
    assert run_matcher([], ["a", "b"]) == ("ab", False)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc d", max_size=40),
    stops=st.lists(st.text(alphabet="abcd", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_any_split_gives_the_text_up_to_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = run_matcher(stops, pieces)
    # Generation ends with the first piece that completes a stop string: text after it is
    # never produced, so a stop that would only complete later (and start earlier, when stops
    # overlap) does not count. The cut is at the earliest stop start within what was produced.
    expected, hit = text, False
    for end in bounds[1:]:
        produced = text[:end]
        hits = [produced.find(s) for s in stops if s in produced]
        if hits:
            expected, hit = text[: min(hits)], True
            break
    assert out == expected
    assert stopped == hit


def test_random_token_sequences_stream_to_the_full_decode(tokenizer) -> None:
    """Whatever a (random-weights) model emits, invalid byte sequences included, the streamed
    deltas add up to the decode of all tokens."""
    import random

    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(200):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        decoder = IncrementalDecoder(lambda t: tokenizer.decode(t, skip_special_tokens=True))
        streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True), ids
