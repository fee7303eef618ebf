"""The plugin manager: built-ins plus whatever entry-point plugins are installed.

Built-in plugins register through the same hooks as third-party ones. Entry points in the group
``cortex`` are loaded one at a time so that a broken plugin is reported with its name and error
instead of taking the process down. ``CORTEX_PLUGINS`` limits which entry points load: unset means
all, an empty value means built-ins only, ``a,b`` means only those.

Collection is typed and isolated (tox's ``plugin/manager.py`` is the model): each plugin's
implementation of a collection hook is called on its own, and everything it registers is checked
against the hook's runtime-checkable Protocol (a harness must have ``name``, ``accepts``,
``files_needed``, ``estimate_memory`` and ``load``; a source plugin ``name``, ``schemes``,
``defaults`` and ``create``; a strategy ``name`` and ``plan``; a device is a
:class:`cortex.devices.Device`). A plugin whose hook raises, or a registration that fails its
check, becomes a :class:`BrokenPlugin` naming the plugin and the error; the other plugins, and
the plugin's own valid registrations, are collected as if nothing happened. So is a source
plugin whose ``create`` fails (:meth:`PluginRegistry.source_broken`): the neuron starts without
that scheme, and ``cortex plugins`` says why.

Nothing outside this module reaches into the process-wide registry on its own: the neuron, the
gateway and the CLI take what they need from :func:`get_registry` once and hand it on (a source
that needed to know the harnesses would be given them; none does since the one harness choice,
:mod:`cortex.harness_choice`, answers that question).
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
from cortex.devices import Device
from cortex.eviction import EvictionStrategy
from cortex.harness import Harness
from cortex.source import SourcePlugin, SourceSettings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cortex"
PLUGINS_ENV = "CORTEX_PLUGINS"


@attrs.frozen
class BrokenPlugin:
    """A plugin that failed to load, whose hook raised, that registered something malformed, or
    whose source failed to start; kept so ``cortex plugins`` can show it. ``name`` is the
    plugin's name as ``cortex plugins`` lists it (its entry point, or the built-in module)."""

    name: str
    error: str


@attrs.frozen
class PluginInfo:
    """One row of ``cortex plugins``. ``provides`` maps a kind (``harnesses``, ``sources``,
    ``schemes``, ``eviction_strategies``) to the names this plugin registered."""

    name: str
    version: str
    hooks: tuple[str, ...]
    builtin: bool
    provides: dict[str, list[str]] = attrs.field(factory=dict)


@attrs.frozen
class Collection:
    """One collection hook: what a registration must be, and what ``cortex plugins`` calls it."""

    hook: str
    kind: str  # "harness", shown in errors
    expected: type  # a runtime-checkable Protocol, or a class
    provides: str  # the key in PluginInfo.provides
    named: bool = True  # registrations need a unique non-empty ``name``


HARNESSES = Collection("cortex_register_harnesses", "harness", Harness, "harnesses")
SOURCES = Collection("cortex_register_sources", "source plugin", SourcePlugin, "sources")
STRATEGIES = Collection(
    "cortex_register_eviction_strategies",
    "eviction strategy",
    EvictionStrategy,
    "eviction_strategies",
)
DEVICES = Collection("cortex_discover_devices", "device", Device, "devices", named=False)
COLLECTIONS = (HARNESSES, SOURCES, STRATEGIES, DEVICES)


def protocol_members(protocol: type) -> list[str]:
    """The public attributes and methods a runtime-checkable Protocol requires, in definition
    order (what :func:`missing_members` checks and the docs guard compares with plugins.md)."""
    members: dict[str, None] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object,) or not getattr(klass, "_is_protocol", False):
            continue
        if klass.__name__ in ("Protocol", "Generic"):
            continue
        for name in getattr(klass, "__annotations__", {}):
            if not name.startswith("_"):
                members[name] = None
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if callable(value) or isinstance(value, property | staticmethod | classmethod):
                members[name] = None
    return list(members)


def missing_members(item: object, protocol: type) -> list[str]:
    """What ``item`` lacks of ``protocol`` (a method must be callable)."""
    missing = []
    for name in protocol_members(protocol):
        if not hasattr(item, name):
            missing.append(name)
            continue
        declared = getattr(protocol, name, None)
        if callable(declared) and not callable(getattr(item, name)):
            missing.append(name)
    return missing


def check_registration(item: object, collection: Collection) -> str | None:
    """None when ``item`` is a valid registration for ``collection``, else why not."""
    expected = collection.expected
    if getattr(expected, "_is_protocol", False):
        missing = missing_members(item, expected)
        if missing:
            return (
                f"registered a {collection.kind} that is not a {expected.__name__}: "
                f"{type(item).__name__} lacks {', '.join(missing)}"
            )
    elif not isinstance(item, expected):
        return (
            f"registered a {collection.kind} that is not a {expected.__name__}: "
            f"{type(item).__name__}"
        )
    if collection.named:
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            return f"registered a {collection.kind} without a non-empty string 'name': {item!r}"
    return None


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginRegistry:
    """A pluggy manager plus what it knows about where each plugin came from and which plugins
    are broken."""

    def __init__(self, allowed: set[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._broken: dict[tuple[str, str], BrokenPlugin] = {}
        self._versions: dict[str, str] = {}
        self._builtin: set[str] = set()
        for module_name in BUILTIN_PLUGIN_MODULES:
            module = importlib.import_module(module_name)
            self.pm.register(module, name=module_name)
            self._versions[module_name] = __version__
            self._builtin.add(module_name)
        self._load_entry_points(allowed)
        self.pm.check_pending()

    @property
    def broken(self) -> list[BrokenPlugin]:
        """Every broken plugin seen so far, in the order found (each error once)."""
        return list(self._broken.values())

    def mark_broken(self, name: str, error: str) -> None:
        """Record ``name`` as broken (logged once per distinct error)."""
        key = (name, error)
        if key not in self._broken:
            log.error("plugin %r is broken: %s", name, error)
            self._broken[key] = BrokenPlugin(name, error)

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
                self.mark_broken(ep.name, _error(exc))
                continue
            self._versions[ep.name] = ep.dist.version if ep.dist is not None else "unknown"

    # ---- collection hooks -----------------------------------------------------------------

    def _collect_by_plugin(self, collection: Collection) -> list[tuple[str, list[Any]]]:
        """Call each plugin's implementation of ``collection.hook`` on its own (in pluggy's
        call order) and return (plugin name, its valid registrations). A raising hook or a bad
        registration marks that plugin broken; it never stops the others."""
        hook = getattr(self.pm.hook, collection.hook)
        collected: list[tuple[str, list[Any]]] = []
        for impl in reversed(hook.get_hookimpls()):  # pluggy calls the last registered first
            plugin = impl.plugin_name
            items: list[Any] = []

            def register(item: Any, _items: list[Any] = items, _plugin: str = plugin) -> None:
                problem = check_registration(item, collection)
                if problem is not None:
                    self.mark_broken(_plugin, f"{collection.hook}: {problem}")
                    return
                _items.append(item)

            kwargs = {"register": register}
            try:
                if impl.hookwrapper or getattr(impl, "wrapper", False):
                    raise TypeError("a collection hook cannot be a wrapper")
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                self.mark_broken(plugin, f"{collection.hook} raised {_error(exc)}")
                continue  # what it registered before raising is not trusted either
            collected.append((plugin, items))
        return collected

    def _collect(self, collection: Collection) -> list[Any]:
        """Every valid registration, unique by ``name`` (the first one wins, with a warning)."""
        found: list[Any] = []
        seen: set[str] = set()
        for plugin, items in self._collect_by_plugin(collection):
            for item in items:
                if not collection.named:
                    found.append(item)
                    continue
                if item.name in seen:
                    log.warning(
                        "%s %r registered twice (again by %s); keeping the first",
                        collection.kind,
                        item.name,
                        plugin,
                    )
                    continue
                seen.add(item.name)
                found.append(item)
        return found

    def harnesses(self) -> list[Harness]:
        return self._collect(HARNESSES)

    def source_plugins(self) -> list[SourcePlugin]:
        return self._collect(SOURCES)

    def eviction_strategies(self) -> dict[str, EvictionStrategy]:
        return {s.name: s for s in self._collect(STRATEGIES)}

    def devices(self) -> list[Device]:
        return self._collect(DEVICES)

    def register_commands(self, cli: Any, program: str) -> None:
        """Let each plugin add its commands; one that raises is broken, the others still add
        theirs."""
        hook = self.pm.hook.cortex_register_commands
        kwargs = {"cli": cli, "program": program}
        for impl in reversed(hook.get_hookimpls()):
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                self.mark_broken(impl.plugin_name, f"cortex_register_commands raised {_error(exc)}")

    # ---- sources --------------------------------------------------------------------------

    def plugin_of(self, source_plugin: SourcePlugin) -> str:
        """The name ``cortex plugins`` lists for the plugin that registered ``source_plugin``."""
        for plugin, items in self._collect_by_plugin(SOURCES):
            if any(getattr(item, "name", None) == source_plugin.name for item in items):
                return plugin
        return source_plugin.name

    def source_broken(
        self, source_plugin: SourcePlugin, settings: SourceSettings, exc: Exception
    ) -> None:
        """A source plugin's ``create`` failed (a helexa plugin whose huggingface dependency is
        not installed): mark its plugin broken. The resolver starts without that scheme."""
        self.mark_broken(
            self.plugin_of(source_plugin),
            f"source plugin {source_plugin.name!r} could not create its {settings.scheme!r} "
            f"source: {_error(exc)}",
        )

    def check_sources(self) -> None:
        """Create each source plugin's default schemes once (no network: ``create`` only reads
        settings) so ``cortex plugins`` reports a plugin that cannot start."""
        for source_plugin in self.source_plugins():
            for scheme in source_plugin.schemes:
                try:
                    defaults = source_plugin.defaults(scheme)
                except Exception as exc:
                    self.mark_broken(
                        self.plugin_of(source_plugin),
                        f"source plugin {source_plugin.name!r} has no defaults for {scheme!r}: "
                        f"{_error(exc)}",
                    )
                    continue
                settings = SourceSettings(
                    scheme=scheme,
                    endpoint=defaults.endpoint,
                    auth_env=defaults.auth_env,
                    cache_dir=defaults.cache_dir,
                    plugin=source_plugin.name,
                )
                try:
                    source_plugin.create(settings)
                except Exception as exc:
                    self.source_broken(source_plugin, settings, exc)

    # ---- listings -------------------------------------------------------------------------

    def provided(self) -> dict[str, dict[str, list[str]]]:
        """plugin name -> kind -> names it registered (harnesses, sources and their schemes,
        eviction strategies). Devices are not listed: discovering them is a neuron's start."""
        provided: dict[str, dict[str, list[str]]] = {}
        for collection in (HARNESSES, SOURCES, STRATEGIES):
            for plugin, items in self._collect_by_plugin(collection):
                if not items:
                    continue
                kinds = provided.setdefault(plugin, {})
                kinds[collection.provides] = [item.name for item in items]
                if collection is SOURCES:
                    kinds["schemes"] = [s for item in items for s in item.schemes]
        return provided

    def plugin_infos(self) -> list[PluginInfo]:
        provided = self.provided()
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            infos.append(
                PluginInfo(
                    name=name,
                    version=self._versions.get(name, "unknown"),
                    hooks=hooks,
                    builtin=name in self._builtin,
                    provides=provided.get(name, {}),
                )
            )
        return sorted(infos, key=lambda i: (not i.builtin, i.name))


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
