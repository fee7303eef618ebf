"""Plugins that ship with core. They register through the same hooks as third-party plugins."""

BUILTIN_PLUGIN_MODULES: tuple[str, ...] = (
    "cortex.builtins.eviction",
    "cortex.builtins.devices",
    "cortex.builtins.echo",
)
