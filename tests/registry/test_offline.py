"""Registry down: a cached model still preflights and fetches; an uncached one fails clearly.

The registry runs as a real process (``cortex registry serve``) so that stopping it really
closes every connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.config import NeuronConfig, SourceSection
from cortex.source import RegistryUnreachableError, WeightFormat
from cortex.source_resolver import SourceResolver
from cortex.testing.registry import publish_repo
from cortex.testing.servers import ProcessServer, python_program

WEIGHTS = b"cached weights " * 100


def test_offline_cached_loads_uncached_fails(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    publish_repo(root, "acme/cached", {"config.json": b"{}", "model.safetensors": WEIGHTS})
    publish_repo(root, "acme/quants", {"m.Q4_K_M.gguf": b"4" * 64, "m.Q8_0.gguf": b"8" * 64})
    publish_repo(root, "acme/uncached", {"config.json": b"{}", "model.safetensors": b"x"})
    server = ProcessServer(
        python_program(
            "cortex.cli", "cortex", "registry", "serve", str(root), "--listen", "127.0.0.1:0"
        )
    ).start()
    try:
        endpoint = server.url
        assert endpoint is not None
        config = NeuronConfig(sources={"helexa": SourceSection(endpoint=endpoint)})
        resolver = SourceResolver.from_config(config)
        model_id, source = resolver.resolve("helexa:acme/cached")
        online = source.preflight(model_id)
        snapshot = source.fetch(model_id, ["config.json", "model.safetensors"])
        quants_id, _ = resolver.resolve("helexa:acme/quants")
        source.fetch(quants_id, [source.preflight(quants_id, quant="q4_k_m").gguf_file])
    finally:
        server.terminate()

    for current in (source, SourceResolver.from_config(config).resolve("helexa:acme/x")[1]):
        offline = current.preflight(model_id)  # the same process, then a restarted neuron
        assert offline.revision == online.revision
        assert offline.weight_format == WeightFormat.SAFETENSORS
        assert offline.size_of("model.safetensors") == len(WEIGHTS)
        again = current.fetch(model_id, ["config.json", "model.safetensors"])
        assert again == snapshot
        assert (again / "model.safetensors").read_bytes() == WEIGHTS
        # a cached quant is served; one that was never fetched is not
        assert current.preflight(quants_id, quant="Q4_K_M").gguf_file == "m.Q4_K_M.gguf"
        with pytest.raises(RegistryUnreachableError, match=endpoint):
            current.preflight(quants_id, quant="Q8_0")

    uncached, _ = resolver.resolve("helexa:acme/uncached")
    with pytest.raises(RegistryUnreachableError) as caught:
        source.preflight(uncached)
    assert endpoint in caught.value.message
    assert caught.value.to_json() | {} == {
        "kind": "registry_unreachable",
        "model_id": "helexa:acme/uncached",
        "message": caught.value.message,
        "endpoint": endpoint,
    }
    with pytest.raises(RegistryUnreachableError, match=endpoint):
        source.fetch(uncached, ["config.json"])
