"""The knobs of a vLLM load, from the load request's ``extra`` (a ``models.toml`` profile's
harness options), ``CORTEX_VLLM_<NAME>`` environment variables, and defaults, in that order.

Everything about capacity (``max_batch``, ``kv_tokens``, the context) comes from the load's
:class:`~cortex.harness.LoadOptions`, as for every harness; these are vLLM's own switches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from cortex.harness import HarnessError, LoadOptions

ENV_PREFIX = "CORTEX_VLLM_"
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _positive(_instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise HarnessError(f"vLLM option {attribute.name} must be >= 1, got {value}")


def _dtype(_instance: Any, _attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and value not in DTYPES:
        raise HarnessError(f"vLLM option dtype must be one of {', '.join(DTYPES)}, got {value!r}")


@attrs.frozen
class VllmSettings:
    """Resolved settings of one load.

    ``dtype``: None picks float32 on CPU (as the torch harness: half precision on CPUs without
    bf16 units is slow) and vLLM's ``auto`` on CUDA. ``enforce_eager``: None is True on CPU
    (no graphs to capture there) and False on CUDA (CUDA graphs, vLLM's default).
    ``max_num_batched_tokens``: vLLM's per-step token budget (its chunked prefill); None is
    vLLM's default. ``prefix_caching``: vLLM's automatic prefix caching (on by default).
    ``max_context``: the context a load gets when it names none, capped so a 128k-context
    model does not reserve a 128k KV cache by default.
    """

    dtype: str | None = attrs.field(default=None, validator=_dtype)
    enforce_eager: bool | None = None
    max_num_batched_tokens: int | None = attrs.field(default=None, validator=_positive)
    prefix_caching: bool = True
    max_context: int = attrs.field(default=8192, validator=_positive)

    def dtype_for(self, device_kind: str) -> str:
        if self.dtype is not None:
            return self.dtype
        return "float32" if device_kind == "cpu" else "auto"

    def eager_for(self, device_kind: str) -> bool:
        if self.enforce_eager is not None:
            return self.enforce_eager
        return device_kind == "cpu"


_FIELDS = {f.name: f for f in attrs.fields(VllmSettings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind in ("str | None", str):
            return str(value).strip().lower()
        if kind in ("bool | None", "bool", bool):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            raise ValueError(value)
        return int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"vLLM option {name}: cannot use {value!r}") from None


def resolve_settings(
    options: LoadOptions, environ: Mapping[str, str] | None = None
) -> VllmSettings:
    """``options.extra`` wins over ``CORTEX_VLLM_<NAME>``, which wins over the defaults; keys
    of ``extra`` this harness does not know are left alone (a profile may carry another
    harness's options)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw not in (None, ""):
            values[name] = _coerce(name, raw)
    for key, value in (options.extra or {}).items():
        if key in _FIELDS and value is not None:
            values[key] = _coerce(key, value)
    return VllmSettings(**values)
