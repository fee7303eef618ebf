"""The hooks a cortex plugin can implement.

Every collection hook takes a ``register`` callback instead of returning a value (the style of
simonw's ``llm`` and ``datasette``): a plugin may register zero, one or many things, and the error
for a bad registration points at the plugin that made it. Hooks are always called with keyword
arguments, so an implementation may accept only the arguments it needs.

``docs/plugins.md`` documents each hook with its exact signature; a guard test keeps the two in
step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from cortex.devices import Device
    from cortex.eviction import EvictionStrategy
    from cortex.harness import Harness
    from cortex.source import SourcePlugin

PROJECT_NAME = "cortex"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def cortex_register_harnesses(register: Callable[[Harness], None]) -> None:
    """Register harnesses: objects that load a fetched repo onto a device and generate from it.

    Call ``register(harness)`` once per harness. A harness has a unique ``name``; says from a
    preflight's file list whether it ``accepts`` a repo and which ``files_needed`` a fetch must
    download; gives an ``estimate_memory`` in bytes before anything is downloaded; and ``load``s a
    local snapshot onto a device, *on that device's worker thread*, returning a loaded model that
    renders chat templates, tokenizes, decodes, starts step-wise generations (one token per
    ``step``, cancellable between steps), resets its KV cache, reports its memory and unloads.
    See :mod:`cortex.harness` for the protocol. Each registration is checked against it; one
    that is not a ``Harness`` makes this plugin broken (reported, never fatal to the others).
    When several harnesses accept a repo, the highest optional integer ``priority`` wins, then
    the name that sorts first (:mod:`cortex.harness_choice`).

    Plugin modules import heavy libraries (torch, llama_cpp) inside these methods, never at module
    import, so a gateway with every plugin installed stays light.
    """


@hookspec
def cortex_register_sources(register: Callable[[SourcePlugin], None]) -> None:
    """Register model-source plugins: where model files come from.

    Call ``register(source_plugin)``. A source plugin has a ``name``, the ``schemes`` it serves by
    default, ``defaults(scheme)`` (endpoint, token env var name, cache dir) used when the operator
    configured nothing for that scheme, and ``create(settings)`` which builds a configured source.
    A configured source runs ``preflight`` (one registry round trip: repo exists, auth ok, which
    weight files, total size) and ``fetch`` (files into *its own* cache dir, with progress), and
    raises typed :class:`cortex.source.SourceError` subclasses that carry the scheme-qualified id.

    A ``[sources.<scheme>]`` table may name the plugin that serves it, so one plugin can serve any
    number of schemes (a private mirror served by the huggingface plugin). A ``create`` that
    raises makes the plugin broken and leaves that scheme unserved; the neuron starts anyway.
    Sources never ask which harness accepts a repo: they describe its files, the neuron decides.
    """


@hookspec
def cortex_register_eviction_strategies(register: Callable[[EvictionStrategy], None]) -> None:
    """Register eviction strategies, selected by name in ``[eviction] strategy``.

    Call ``register(strategy)``. ``strategy.plan(candidates, bytes_needed, bytes_free)`` receives
    one node's loaded models (size, last use, priority, pinned, in-flight count) and returns an
    :class:`cortex.eviction.EvictionPlan`: the models to unload so the load fits, or a reason it
    cannot fit. A strategy must never pick a pinned model or one with requests in flight, and must
    not return a partial plan (:func:`cortex.eviction.plan_in_order` enforces both).
    """


@hookspec
def cortex_discover_devices(register: Callable[[Device], None]) -> None:
    """Register the devices of this machine that models can be placed on.

    Called once when a neuron starts. Core registers the CPU device and any CUDA devices; a plugin
    for another accelerator registers its own :class:`cortex.devices.Device` objects (with a
    ``kind`` of its own) and a harness that knows how to load onto them.
    """


@hookspec
def cortex_register_commands(cli: click.Group, program: str) -> None:
    """Add commands to a command-line program.

    ``program`` is ``"cortex"`` or ``"neuron"``; ``cli`` is that program's click group. Add
    commands with ``@cli.command()``. An implementation that takes only ``cli`` is called for both
    programs.
    """
