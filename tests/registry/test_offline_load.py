"""The whole path with a real tiny model: registry -> source cache -> registry gone -> the cached
model still preflights, fetches and loads (torch harness, CPU), token for token."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.config import NeuronConfig, SourceSection
from cortex.devices import cpu_device
from cortex.harness import LoadOptions, SamplingParams
from cortex.source import RegistryUnreachableError
from cortex.source_resolver import SourceResolver
from cortex.testing.registry import publish_repo
from cortex.testing.servers import ProcessServer, python_program


def greedy(model, n: int = 6) -> list[int]:
    prompt = model.render_chat([{"role": "user", "content": "hello the cat"}])
    generation = model.start(prompt, SamplingParams(temperature=0))
    try:
        return [generation.step().token_id for _ in range(n)]
    finally:
        generation.close()


@pytest.mark.slow  # builds a tiny model and imports torch
def test_cached_model_loads_with_the_registry_down(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("cortex_harness_torch")
    from cortex_harness_torch.harness import TorchHarness

    harness = TorchHarness()
    root = tmp_path / "repos"
    publish_repo(root, "acme/tiny-llama", tiny_llama_dir)
    server = ProcessServer(
        python_program(
            "cortex.cli", "cortex", "registry", "serve", str(root), "--listen", "127.0.0.1:0"
        )
    ).start()
    config = NeuronConfig(sources={"helexa": SourceSection(endpoint=str(server.url))})
    try:
        model_id, source = SourceResolver.from_config(config).resolve("helexa:acme/tiny-llama")
        preflight = source.preflight(model_id)
        assert harness.accepts(preflight)
        source.fetch(model_id, harness.files_needed(preflight), revision=preflight.revision)
    finally:
        server.terminate()

    # a restarted neuron, registry gone
    model_id, source = SourceResolver.from_config(config).resolve("helexa:acme/tiny-llama")
    offline = source.preflight(model_id)
    assert offline.revision == preflight.revision
    snapshot = source.fetch(model_id, harness.files_needed(offline))
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(harness.files_needed(offline))
    cached = harness.load(snapshot, cpu_device(), LoadOptions())
    reference = harness.load(tiny_llama_dir, cpu_device(), LoadOptions())
    try:
        assert greedy(cached) == greedy(reference)
    finally:
        cached.unload()
        reference.unload()
    with pytest.raises(RegistryUnreachableError, match=str(server.url)):
        source.preflight(SourceResolver.from_config(config).canonical("helexa:acme/other"))
