"""cortex's model id grammar and huggingface_hub's repo-id validation agree (issue 22).

Every id ``ModelSourceId.parse`` accepts must be one the hub client accepts, or a bad id falls
through to a registry error after a round trip (it was a retryable 503 ``fetch_failed``). And an
id the hub refuses that reaches the source anyway is a 400 ``invalid_repo_name``, not a 503.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cortex_source_huggingface.hub import HubSource
from huggingface_hub.utils import validate_repo_id
from hypothesis import given
from hypothesis import strategies as st

from cortex.source import InvalidRepoIdError, ModelIdError, ModelSourceId, SourceSettings

# Characters around the edges of both grammars: ASCII punctuation, look-alikes, non-ASCII.
ALPHABET = "aZ09_-./:@{}%~+=!$&'()*,;[]|^`\"<>\uff0e\u00e9\u0430\u200b"


_near = st.text(alphabet="aZ09_-.", min_size=1, max_size=12)  # mostly valid, edges included
_odd = st.text(alphabet=ALPHABET, min_size=1, max_size=12)
_part = st.one_of(_near, _near, _odd)
ids = st.one_of(
    st.builds(lambda org, name: f"{org}/{name}", _part, _part),
    st.builds(lambda s, org, name: f"{s}:{org}/{name}", _part, _part, _part),
    _odd,
)


@given(raw=ids)
def test_every_id_cortex_accepts_the_hub_accepts(raw: str) -> None:
    try:
        parsed = ModelSourceId.parse(raw)
    except ModelIdError:
        return
    validate_repo_id(parsed.repo_path)


@pytest.mark.parametrize("repo", ["Qwen/Qwen2.5-0.5B-Instruct", "a/" + "b" * 96, "_x/y_"])
def test_edge_ids_both_accept(repo: str) -> None:
    validate_repo_id(ModelSourceId.parse(repo).repo_path)


def test_an_id_the_hub_refuses_is_a_400_error(tmp_path: Path) -> None:
    """Built around the parser (a plugin may get one from elsewhere): no request is made."""
    source = HubSource(
        SourceSettings(
            scheme="huggingface",
            endpoint="http://127.0.0.1:9",  # nothing listens: a request would be unreachable
            auth_env=None,
            cache_dir=tmp_path / "cache",
            plugin="huggingface",
        )
    )
    with pytest.raises(InvalidRepoIdError) as caught:
        source.preflight(ModelSourceId(scheme="huggingface", org="0", name="{"))
    assert caught.value.http_status == 400
    assert caught.value.to_json()["kind"] == "invalid_repo_name"
