"""Which installed harness loads a repo: one rule, used by every caller that asks.

The neuron's loads and estimates (:mod:`cortex.neuron.loader`), ``neuron pull`` and anything
else that must pick a harness for a preflighted repo call :func:`choose_harness`; nothing else
ranks harnesses. The rule (docs/plugins.md, "Which harness loads a repo"):

1. **A harness that was asked for** (the load's ``harness``, a ``models.toml`` profile's
   ``harness``, ``neuron pull --harness``) is used, or the request fails: it must be installed
   and accept the repo. A named harness is never silently swapped for another.
2. **Otherwise** every installed harness whose ``accepts(preflight)`` is true is a candidate;
   the one with the highest ``priority`` wins (an optional integer attribute of the harness,
   default 0), and among equal priorities the name that sorts first. Installation order
   (entry-point order, which differs between machines) never decides.

The sources do not ask: a repo whose files carry no weights by name is described all the same
(``weight_format = "none"``), and this function answers ``no_loadable_weights`` when no harness
accepts it (a repo with an ``echo.json`` is loadable by the built-in ``echo`` harness).

Errors are :class:`cortex.wire.errors.ApiError` with the neuron's codes: 400 ``invalid_request``
(``param: harness``) for a harness that is not installed, 422 ``harness_rejects_repo``,
``no_harness`` and ``no_loadable_weights`` (with the source-error ``details`` of that kind).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cortex.harness import Harness
from cortex.source import NoLoadableWeightsError, Preflight, WeightFormat
from cortex.wire.errors import ApiError, bad_request

DEFAULT_PRIORITY = 0


def harness_priority(harness: Harness) -> int:
    """A harness's ``priority`` attribute (higher wins), 0 when it has none or a non-integer."""
    value = getattr(harness, "priority", DEFAULT_PRIORITY)
    return value if isinstance(value, int) and not isinstance(value, bool) else DEFAULT_PRIORITY


def ranked(harnesses: Iterable[Harness]) -> list[Harness]:
    """``harnesses`` in the order of the rule: highest priority first, then by name."""
    return sorted(harnesses, key=lambda h: (-harness_priority(h), h.name))


def accepting(harnesses: Iterable[Harness], preflight: Preflight) -> list[Harness]:
    """The harnesses that accept the repo, ranked (the first is the one :func:`choose_harness`
    picks when none was asked for)."""
    return [h for h in ranked(harnesses) if h.accepts(preflight)]


def choose_harness(
    harnesses: Mapping[str, Harness] | Iterable[Harness],
    preflight: Preflight,
    requested: str | None = None,
) -> Harness:
    """The harness that loads ``preflight``'s repo, by the rule in the module docstring."""
    by_name = (
        dict(harnesses)
        if isinstance(harnesses, Mapping)
        else {h.name: h for h in harnesses}  # the first of a duplicated name wins
    )
    installed = ", ".join(sorted(by_name)) or "none"
    if requested is not None:
        harness = by_name.get(requested)
        if harness is None:
            raise bad_request(
                f"harness {requested!r} is not installed on this node (installed: {installed})",
                param="harness",
            )
        if not harness.accepts(preflight):
            raise ApiError(
                422,
                "harness_rejects_repo",
                f"harness {requested!r} cannot load {preflight.model_id} "
                f"(weights: {preflight.weight_format})",
                param="harness",
            )
        return harness
    candidates = accepting(by_name.values(), preflight)
    if candidates:
        return candidates[0]
    if preflight.weight_format == WeightFormat.NONE:
        files = preflight.file_names()
        shown = ", ".join(files[:20]) or "no files at all"
        error = NoLoadableWeightsError(
            preflight.model_id,
            f"{preflight.model_id} has no loadable weights (no *.gguf and no *.safetensors "
            f"files, and no installed harness accepts it; found: {shown})",
            files=files,
        )
        raise ApiError(
            422,
            error.kind,
            f"preflight: {error.message}",
            param="model_id",
            details=error.to_json(),
        )
    raise ApiError(
        422,
        "no_harness",
        f"no installed harness can load {preflight.model_id} "
        f"(weights: {preflight.weight_format}; installed: {installed})",
        param="model_id",
    )
