"""From a model id string to the configured source that serves it.

A neuron knows its sources from ``neuron.toml`` plus the installed source plugins' defaults
(:func:`cortex.config.effective_sources`). This module builds one :class:`ModelSource` per scheme
(each reads its token once, here, at start) and answers the one question the rest of the neuron
asks: *which source serves this id, and what is its canonical form?*

API (used by the neuron for ``/models/load``, ``/models/estimate`` and ``/discovery``, and by
``neuron pull``)::

    resolver = SourceResolver.from_config(neuron_config)
    model_id, source = resolver.resolve("acme/tiny")   # bare -> default_source
    str(model_id)                                      # "huggingface:acme/tiny"
    source.preflight(model_id, quant="Q4_K_M")
    resolver.describe()  # [{"scheme", "plugin", "endpoint", "has_token", "cache_dir", "installed"}]

Errors: a malformed id raises :class:`cortex.source.ModelIdError` (a 400); a scheme nobody
configured raises :class:`cortex.source.UnknownSchemeError` naming the configured schemes; a
scheme whose plugin is not installed
or whose plugin failed to create it raises :class:`SourcePluginMissingError` naming the plugin.
None of the last two stops the neuron from starting: the other schemes keep working.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from cortex.config import ConfigError, NeuronConfig, effective_sources
from cortex.source import (
    ModelSource,
    ModelSourceId,
    SourceDefaults,
    SourceError,
    SourcePlugin,
    SourceSettings,
    UnknownSchemeError,
)

log = logging.getLogger(__name__)


class SourcePluginMissingError(SourceError):
    """A configured scheme names a source plugin that is not installed (or failed to load)."""

    kind = "source_plugin_missing"
    http_status = 400


SourceBroken = Callable[[SourcePlugin, SourceSettings, Exception], None]
"""Told when a source plugin's ``create`` raised (the plugin registry marks it broken)."""


class SourceResolver:
    """The configured sources of one process, one :class:`ModelSource` per scheme."""

    def __init__(
        self,
        default_source: str,
        settings: Mapping[str, SourceSettings],
        plugins: Mapping[str, SourcePlugin],
        on_broken: SourceBroken | None = None,
    ) -> None:
        if default_source not in settings:
            raise ConfigError(
                f"default_source {default_source!r} is not a configured source "
                f"(configured: {', '.join(sorted(settings))})"
            )
        self.default_source = default_source
        self.settings = dict(settings)
        self._sources: dict[str, ModelSource] = {}
        self._missing: dict[str, str] = {}
        self._broken: dict[str, str] = {}  # scheme -> why its plugin could not create it
        for scheme, scheme_settings in self.settings.items():
            plugin = plugins.get(scheme_settings.plugin)
            if plugin is None:
                self._missing[scheme] = scheme_settings.plugin
                log.warning(
                    "source %r needs the plugin %r, which is not installed; ids %s:... will fail",
                    scheme,
                    scheme_settings.plugin,
                    scheme,
                )
                continue
            try:
                source = plugin.create(scheme_settings)
            except Exception as exc:  # one plugin that cannot start never stops the neuron
                self._missing[scheme] = scheme_settings.plugin
                self._broken[scheme] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "source %r could not be created by the plugin %r (%s); ids %s:... will fail",
                    scheme,
                    scheme_settings.plugin,
                    self._broken[scheme],
                    scheme,
                )
                if on_broken is not None:
                    on_broken(plugin, scheme_settings, exc)
                continue
            self._sources[scheme] = source

    @classmethod
    def from_config(
        cls,
        config: NeuronConfig,
        plugins: list[SourcePlugin] | None = None,
        environ: Mapping[str, str] | None = None,
        on_broken: SourceBroken | None = None,
    ) -> SourceResolver:
        """Build the sources ``config`` describes, over the installed plugins' defaults.

        ``plugins`` defaults to every installed source plugin (cortex.plugins.get_registry()),
        ``on_broken`` to that registry's ``source_broken`` (a plugin whose ``create`` fails is
        reported broken and its scheme refused; the other schemes work).
        Raises :class:`ConfigError` for an unusable configuration (a scheme without an endpoint,
        two schemes sharing a cache dir, a default source that is not configured).
        """
        if plugins is None:
            from cortex.plugins import get_registry

            registry = get_registry()
            plugins = registry.source_plugins()
            on_broken = on_broken or registry.source_broken
        by_name = {plugin.name: plugin for plugin in plugins}
        defaults: dict[str, tuple[str, SourceDefaults]] = {}
        for plugin in plugins:
            for scheme in plugin.schemes:
                defaults.setdefault(scheme, (plugin.name, plugin.defaults(scheme)))
        # A mirror ([sources.x] naming a plugin for a scheme it does not serve by default) takes
        # no defaults at all: it must name its endpoint, and it gets no token and a cache of its
        # own unless configured, so a Hugging Face token never travels to a mirror by accident.
        settings = effective_sources(config, defaults, environ)
        return cls(config.default_source, settings, by_name, on_broken)

    # ---- lookups ---------------------------------------------------------------------------

    @property
    def schemes(self) -> list[str]:
        """Every configured scheme, sorted."""
        return sorted(self.settings)

    def canonical(self, raw_id: str) -> ModelSourceId:
        """Parse ``raw_id`` and give a bare id the default scheme (raises ModelIdError)."""
        return ModelSourceId.parse(raw_id).with_default_scheme(self.default_source)

    def source(self, scheme: str, model_id: str | None = None) -> ModelSource:
        """The source of ``scheme``; ``model_id`` only goes into the error message."""
        shown = model_id or f"{scheme}:"
        if scheme in self._sources:
            return self._sources[scheme]
        if scheme in self._broken:
            raise SourcePluginMissingError(
                shown,
                f"source {scheme!r} is served by the plugin {self._missing[scheme]!r}, which "
                f"failed to start it ({self._broken[scheme]}); `neuron plugins` shows why",
                scheme=scheme,
                plugin=self._missing[scheme],
            )
        if scheme in self._missing:
            raise SourcePluginMissingError(
                shown,
                f"source {scheme!r} is served by the plugin {self._missing[scheme]!r}, which is "
                "not installed (pip install it, or remove [sources."
                f"{scheme}] from neuron.toml)",
                scheme=scheme,
                plugin=self._missing[scheme],
            )
        raise UnknownSchemeError(
            shown,
            f"unknown source scheme {scheme!r} in {shown!r}; configured schemes: "
            f"{', '.join(self.schemes)}",
            scheme=scheme,
            configured_schemes=self.schemes,
        )

    def resolve(self, raw_id: str | ModelSourceId) -> tuple[ModelSourceId, ModelSource]:
        """``raw_id`` -> (canonical ``scheme:org/name`` id, the source that serves it)."""
        model_id = (
            raw_id.with_default_scheme(self.default_source)
            if isinstance(raw_id, ModelSourceId)
            else self.canonical(raw_id)
        )
        assert model_id.scheme is not None
        return model_id, self.source(model_id.scheme, str(model_id))

    def describe(self) -> list[dict[str, Any]]:
        """One entry per scheme for ``/discovery``; never the token itself."""
        entries = []
        for scheme in self.schemes:
            settings = self.settings[scheme]
            source = self._sources.get(scheme)
            entries.append(
                {
                    "scheme": scheme,
                    "plugin": settings.plugin,
                    "endpoint": settings.endpoint,
                    "has_token": bool(source is not None and source.has_token),
                    "cache_dir": str(settings.cache_dir),
                    "installed": source is not None,
                    "default": scheme == self.default_source,
                }
            )
        return entries
