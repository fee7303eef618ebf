"""ModelSourceId: parsing order, typed errors, safety checks and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.source import (
    EmptyModelIdError,
    EmptyNameError,
    EmptyOrgError,
    EmptySchemeError,
    MissingSlashError,
    ModelIdError,
    ModelSourceId,
    NameContainsColonError,
    SchemeContainsSlashError,
    UnsafeModelIdError,
    canonical_model_id,
)


@pytest.mark.parametrize(
    ("raw", "scheme", "org", "name"),
    [
        ("Qwen/Qwen3-8B", None, "Qwen", "Qwen3-8B"),
        ("huggingface:Qwen/Qwen3-8B", "huggingface", "Qwen", "Qwen3-8B"),
        ("helexa:org/name", "helexa", "org", "name"),
        ("a/b/c", None, "a", "b/c"),
        ("hf:unsloth/Qwen3-GGUF", "hf", "unsloth", "Qwen3-GGUF"),
    ],
)
def test_parse_valid(raw: str, scheme: str | None, org: str, name: str) -> None:
    parsed = ModelSourceId.parse(raw)
    assert (parsed.scheme, parsed.org, parsed.name) == (scheme, org, name)
    assert str(parsed) == raw
    assert parsed.repo_path == f"{org}/{name}"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("", EmptyModelIdError),
        (":org/name", EmptySchemeError),
        ("Qwen/Q3:x", SchemeContainsSlashError),
        ("hf:orgname", MissingSlashError),
        ("orgname", MissingSlashError),
        ("/name", EmptyOrgError),
        ("hf:/name", EmptyOrgError),
        ("org/", EmptyNameError),
        ("hf:org/", EmptyNameError),
        ("hf:Q/N:x", NameContainsColonError),
    ],
)
def test_parse_errors_in_order(raw: str, error: type[ModelIdError]) -> None:
    with pytest.raises(error) as excinfo:
        ModelSourceId.parse(raw)
    assert isinstance(excinfo.value, ModelIdError)
    assert excinfo.type is error
    assert repr(raw) in str(excinfo.value)


@pytest.mark.parametrize(
    "raw",
    [
        "org/..",
        "../name",
        "org/../../etc",
        "org/./name",
        "hf:../x",
        "org/na\\me",
        "org/na me",
        "org/name\n",
        "org/na\x00me",
        "org/name?rev=1",
        "org/name#frag",
        "org//name",
        "org/name/",
        "..:org/name",
    ],
)
def test_unsafe_ids_are_refused(raw: str) -> None:
    with pytest.raises(UnsafeModelIdError) as excinfo:
        ModelSourceId.parse(raw)
    assert repr(raw) in str(excinfo.value)


def test_default_scheme_never_overrides_explicit() -> None:
    bare = ModelSourceId.parse("Qwen/X")
    assert str(bare.with_default_scheme("huggingface")) == "huggingface:Qwen/X"
    explicit = ModelSourceId.parse("helexa:Qwen/X")
    assert str(explicit.with_default_scheme("huggingface")) == "helexa:Qwen/X"
    assert canonical_model_id("Qwen/X", "helexa") == "helexa:Qwen/X"
    assert bare.with_default_scheme("huggingface").repo_path == "Qwen/X"


_segment = st.text(
    alphabet=st.characters(
        whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters="-_.", max_codepoint=0x24F
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))


@given(
    scheme=st.one_of(st.none(), _segment),
    org=_segment,
    names=st.lists(_segment, min_size=1, max_size=3),
)
def test_valid_ids_round_trip(scheme: str | None, org: str, names: list[str]) -> None:
    name = "/".join(names)
    raw = f"{org}/{name}" if scheme is None else f"{scheme}:{org}/{name}"
    parsed = ModelSourceId.parse(raw)
    assert str(parsed) == raw
    assert ModelSourceId.parse(str(parsed)) == parsed
    assert parsed.repo_path == f"{org}/{name}"
