"""The plugin manager: built-ins plus whatever entry-point plugins are installed.

Built-in plugins register through the same hooks as third-party ones. Entry points in the group
``cortex`` are loaded one at a time so that a broken plugin is reported with its name and error
instead of taking the process down. ``CORTEX_PLUGINS`` limits which entry points load: unset means
all, an empty value means built-ins only, ``a,b`` means only those.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

import attrs
import pluggy

from cortex import __version__, hookspecs
from cortex.builtins import BUILTIN_PLUGIN_MODULES

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cortex"
PLUGINS_ENV = "CORTEX_PLUGINS"


@attrs.frozen
class BrokenPlugin:
    """An entry point that failed to load or register; kept so ``cortex plugins`` can show it."""

    name: str
    error: str


@attrs.frozen
class PluginInfo:
    """One row of ``cortex plugins``."""

    name: str
    version: str
    hooks: tuple[str, ...]
    builtin: bool


class PluginRegistry:
    """A pluggy manager plus what it knows about where each plugin came from."""

    def __init__(self, allowed: set[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self._versions: dict[str, str] = {}
        self._builtin: set[str] = set()
        for module_name in BUILTIN_PLUGIN_MODULES:
            module = importlib.import_module(module_name)
            self.pm.register(module, name=module_name)
            self._versions[module_name] = __version__
            self._builtin.add(module_name)
        self._load_entry_points(allowed)
        self.pm.check_pending()

    def _load_entry_points(self, allowed: set[str] | None) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
                self.pm.check_pending()
            except Exception as exc:
                if self.pm.has_plugin(ep.name):
                    self.pm.unregister(name=ep.name)
                message = f"{type(exc).__name__}: {exc}"
                log.error("plugin %r could not be loaded: %s", ep.name, message)
                self.broken.append(BrokenPlugin(ep.name, message))
                continue
            self._versions[ep.name] = ep.dist.version if ep.dist is not None else "unknown"

    # ---- listings -----------------------------------------------------------------------

    def plugin_infos(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            infos.append(
                PluginInfo(
                    name=name,
                    version=self._versions.get(name, "unknown"),
                    hooks=hooks,
                    builtin=name in self._builtin,
                )
            )
        return sorted(infos, key=lambda i: (not i.builtin, i.name))

    # ---- collection hooks -----------------------------------------------------------------

    def _collect(self, hook_name: str, kind: str) -> list[Any]:
        """Call a ``register``-style hook and return what was registered, unique by ``name``."""
        collected: list[Any] = []
        seen: dict[str, Any] = {}

        def register(item: Any) -> None:
            name = getattr(item, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(f"a registered {kind} needs a non-empty string 'name': {item!r}")
            if name in seen:
                log.warning("%s %r registered twice; keeping the first", kind, name)
                return
            seen[name] = item
            collected.append(item)

        getattr(self.pm.hook, hook_name)(register=register)
        return collected

    def harnesses(self) -> list[Any]:
        return self._collect("cortex_register_harnesses", "harness")

    def source_plugins(self) -> list[Any]:
        return self._collect("cortex_register_sources", "source plugin")

    def eviction_strategies(self) -> dict[str, Any]:
        return {s.name: s for s in self._collect("cortex_register_eviction_strategies", "strategy")}

    def devices(self) -> list[Any]:
        found: list[Any] = []
        self.pm.hook.cortex_discover_devices(register=found.append)
        return found

    def register_commands(self, cli: Any, program: str) -> None:
        self.pm.hook.cortex_register_commands(cli=cli, program=program)


def allowed_from_env(environ: dict[str, str] | None = None) -> set[str] | None:
    """Parse ``CORTEX_PLUGINS``: None (unset) = all, empty = none, else the named entry points."""
    value = (environ if environ is not None else os.environ).get(PLUGINS_ENV)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


_registry: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide plugin registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = PluginRegistry(allowed_from_env())
    return _registry


def reset_registry() -> None:
    """Forget the process-wide registry (tests that change ``CORTEX_PLUGINS`` use this)."""
    global _registry
    _registry = None


T = TypeVar("T")
Register = Callable[[T], None]
