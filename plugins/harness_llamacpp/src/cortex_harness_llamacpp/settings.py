"""The knobs of a llama.cpp load, resolved once from the load request, the environment and defaults.

A model profile or load request passes harness options through ``LoadOptions.extra`` (for example
``{"n_threads": 8}``); a node-wide default can come from an environment variable
(``CORTEX_LLAMACPP_N_THREADS``, ...), so an operator can size llama.cpp to a machine without
touching every profile. Anything else takes the default below. How many generations run at once
and how many KV cells they share is not a llama.cpp setting any more but the load's batching
capacity (``max_batch``, ``kv_tokens``), the same for every harness.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from cortex.harness import HarnessError, LoadOptions

ENV_PREFIX = "CORTEX_LLAMACPP_"
DEFAULT_MAX_CONTEXT = 8192
DEFAULT_BATCH = 512
# Settings of earlier versions, now the load's batching capacity: naming one is an error that
# says what replaced it, never silently ignored.
RETIRED = {
    "parallel": 'max_batch ([devices."<key>"] max_batch in neuron.toml, max_batch in models.toml)',
    "batch_streams": "nothing: every running generation is decoded in one batch",
}


def available_cpus() -> int:
    """CPUs this process may run on (honours taskset/cgroup affinity, unlike cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


FLASH_ATTN_MODES = ("auto", "on", "off")
# ``auto``: what the GGUF says (embedding.py decides whether it is an embedding model); a named
# pooling serves the file in embedding mode with it, like llama-server's --embedding --pooling.
POOLING_MODES = ("auto", "mean", "cls", "last")


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise HarnessError(
                f"llama.cpp option {attribute.name} must be one of {', '.join(choices)}, "
                f"got {value!r}"
            )

    return check


def _positive(_instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise HarnessError(f"llama.cpp option {attribute.name} must be >= 1, got {value}")


@attrs.frozen
class LlamaCppSettings:
    """Resolved settings of one load.

    ``max_context`` caps the context taken from the GGUF metadata when the request names none
    (GGUF files often declare 128k contexts whose KV cache would not fit); ``n_batch`` is the
    most tokens one ``llama_decode`` takes (a larger scheduler step is decoded in parts);
    ``prefix_cache`` keeps a finished generation's KV cache so a request sharing its prefix
    skips that part of the prefill; ``flash_attn`` is llama.cpp's choice by default (``auto``:
    on where the backend supports it), ``on`` or ``off`` to force it. ``pooling`` (``auto``:
    the GGUF decides) makes any GGUF an embedding model with that pooling;
    ``normalize_embeddings`` scales each vector to unit length (what llama-server does by
    default).
    """

    n_threads: int | None = attrs.field(default=None, validator=_positive)
    n_threads_batch: int | None = attrs.field(default=None, validator=_positive)
    max_context: int = attrs.field(default=DEFAULT_MAX_CONTEXT, validator=_positive)
    n_batch: int = attrs.field(default=DEFAULT_BATCH, validator=_positive)
    prefix_cache: bool = True
    flash_attn: str = attrs.field(default="auto", validator=_one_of(FLASH_ATTN_MODES))
    pooling: str = attrs.field(default="auto", validator=_one_of(POOLING_MODES))
    normalize_embeddings: bool = True

    @property
    def threads(self) -> int:
        """Threads for single-token decode: llama.cpp's usual choice, half the CPUs."""
        return self.n_threads or max(1, available_cpus() // 2)

    @property
    def threads_batch(self) -> int:
        """Threads for batches (prompt chunks, and the decode step of several streams): one less
        than the CPUs unless told otherwise. The neuron's event loop needs a core while
        streams run: with every core taken, each batched step waits for the busy one (the
        torch harness's CPU threads follow the same rule, docs/harnesses.md)."""
        return self.n_threads_batch or self.n_threads or max(1, available_cpus() - 1)


_FIELDS = {f.name: f for f in attrs.fields(LlamaCppSettings)}


def _coerce(name: str, value: Any) -> Any:
    field_type = _FIELDS[name].type
    if field_type in ("str", str):
        return str(value).strip().lower()
    try:
        if field_type in ("bool", bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(value, bool):
            raise ValueError(value)
        return int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"llama.cpp option {name}: cannot use {value!r}") from None


def resolve_settings(
    options: LoadOptions, environ: Mapping[str, str] | None = None
) -> LlamaCppSettings:
    """Settings for one load: ``options.extra`` wins over ``CORTEX_LLAMACPP_<NAME>`` env vars,
    which win over the defaults. Keys of ``extra`` this harness does not know are left alone: the
    same profile may carry options for another harness."""
    env = os.environ if environ is None else environ
    for name, replacement in RETIRED.items():
        if (options.extra or {}).get(name) is not None or env.get(ENV_PREFIX + name.upper()):
            raise HarnessError(
                f"llama.cpp option {name} (or {ENV_PREFIX}{name.upper()}) is replaced by "
                f"{replacement}"
            )
    values: dict[str, Any] = {}
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw not in (None, ""):
            values[name] = _coerce(name, raw)
    for key, value in (options.extra or {}).items():
        if key in _FIELDS:
            values[key] = _coerce(key, value)
    return LlamaCppSettings(**values)
