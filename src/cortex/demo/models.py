"""The demo's model repos, built on this machine (nothing is downloaded).

- ``demo/tiny-llama``: a 2-layer random Llama with a trained BPE tokenizer
  (:mod:`cortex.testing.tiny_models`), served by the torch harness. Its text is gibberish, but
  every step is real: safetensors, chat template, prefill/decode, streaming detokenisation.
- ``demo/tiny-llama-gguf``: the same weights as GGUF, when the llama.cpp harness is installed.
- ``demo/echo-a``, ``-b``, ``-c``: echo models (:mod:`cortex.builtins.echo`) that claim 100 MB
  each, so the second neuron (250 MB) can hold two and the third forces an eviction.
- ``demo/agent`` (alias ``agent``): an echo model with a coding agent's context (256k tokens),
  for the Claude Code / Codex commands the demo prints: their first request is ~56k tokens of
  system prompt and tools, which no tiny model's 256-token context holds.

Repos land in ``<data>/repos`` in the layout ``cortex registry serve`` reads. A marker file makes
a second run reuse them (seconds instead of a rebuild).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import attrs

TORCH_MODEL = "demo/tiny-llama"
GGUF_MODEL = "demo/tiny-llama-gguf"
ECHO_MODELS = ("demo/echo-a", "demo/echo-b", "demo/echo-c")
ECHO_MEMORY_MB = 100
AGENT_MODEL = "demo/agent"
AGENT_MEMORY_MB = 16
AGENT_CONTEXT = 262144
# Bumped when what the demo builds changes, so an old demo-data folder is rebuilt.
BUILD_VERSION = "2"


@attrs.frozen
class DemoModels:
    """What was built: repo ids (``org/name``) by role."""

    repos_dir: Path
    torch_model: str | None
    gguf_model: str | None
    echo_models: tuple[str, ...]
    agent_model: str | None = None

    @property
    def all(self) -> list[str]:
        return [
            m for m in (self.torch_model, self.gguf_model, *self.echo_models, self.agent_model) if m
        ]


def harness_installed(name: str) -> bool:
    """Whether a harness distribution *and* its library can be imported (without importing)."""
    modules = {
        "torch": ("cortex_harness_torch", "torch", "transformers"),
        "llamacpp": ("cortex_harness_llamacpp", "llama_cpp"),
        "vllm": ("cortex_harness_vllm", "vllm"),
    }[name]
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _echo_spec(repo: str) -> dict[str, object]:
    short = repo.rsplit("/", 1)[1]
    return {
        "reply": f"Hello from {short}! I am an echo model: no weights, no GPU, scripted replies.",
        "memory_mb": ECHO_MEMORY_MB,
        "tokens_per_second": 200.0,
    }


def agent_spec() -> dict[str, object]:
    """``demo/agent``'s echo.json: answers any agent politely, with room for its prompt."""
    return {
        "reply": "Hello from the cortex demo! I am an echo model (scripted replies, no "
        "weights); point your agent at a real model in models.toml for real work.",
        "memory_mb": AGENT_MEMORY_MB,
        "context_length": AGENT_CONTEXT,
        "tokens_per_second": 200.0,
    }


def build_demo_models(data_dir: Path, log: Callable[[str], None] = print) -> DemoModels:
    """Build (or reuse) every demo repo under ``data_dir/repos``."""
    from cortex.testing.registry import publish_repo

    repos = data_dir / "repos"
    build = data_dir / "build"
    marker = data_dir / "built.json"
    want_torch = harness_installed("torch")
    want_gguf = want_torch and harness_installed("llamacpp")
    wanted = {"version": BUILD_VERSION, "torch": want_torch, "gguf": want_gguf}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log(f"reusing the demo models in {repos} (delete {data_dir} to rebuild)")
    else:
        shutil.rmtree(repos, ignore_errors=True)
        shutil.rmtree(build, ignore_errors=True)
        for repo in ECHO_MODELS:
            files = {"echo.json": json.dumps(_echo_spec(repo), indent=2)}
            files["README.md"] = f"# {repo}\n\nAn echo model for the cortex demo.\n"
            publish_repo(repos, repo, files)
            log(f"built {repo} (echo, declares {ECHO_MEMORY_MB} MB)")
        agent = {"echo.json": json.dumps(agent_spec(), indent=2)}
        agent["README.md"] = f"# {AGENT_MODEL}\n\nThe demo's model for coding agents.\n"
        publish_repo(repos, AGENT_MODEL, agent)
        log(f"built {AGENT_MODEL} (echo with a {AGENT_CONTEXT}-token context, for agents)")
        if want_torch:
            from cortex.testing.tiny_models import build_tiny_model

            model_dir = build_tiny_model(build / "tiny-llama", arch="llama", seed=0)
            publish_repo(repos, TORCH_MODEL, model_dir)
            log(f"built {TORCH_MODEL} (random 2-layer Llama, safetensors, torch harness)")
            if want_gguf:
                from cortex.testing.tiny_gguf import build_tiny_gguf_repo

                gguf_dir = build_tiny_gguf_repo(
                    build / "tiny-llama-gguf", quants=("F16",), model_dir=model_dir
                )
                publish_repo(repos, GGUF_MODEL, gguf_dir)
                log(f"built {GGUF_MODEL} (the same weights as GGUF F16, llama.cpp harness)")
        else:
            log("the torch harness is not installed: the demo runs with echo models only")
        marker.write_text(json.dumps(wanted))
    return DemoModels(
        repos_dir=repos,
        torch_model=TORCH_MODEL if want_torch else None,
        gguf_model=GGUF_MODEL if want_gguf else None,
        echo_models=ECHO_MODELS,
        agent_model=AGENT_MODEL,
    )
