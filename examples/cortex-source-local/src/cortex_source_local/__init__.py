"""cortex-source-local: model repos served from a directory already on disk (the ``local`` scheme).

This module is what the ``cortex`` entry point names; pluggy finds the ``@hookimpl`` functions in
it. It stays tiny and cheap to import: the gateway imports every installed plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from cortex.hookspecs import hookimpl
from cortex.source import SourcePlugin
from cortex_source_local.plugin import LocalSourcePlugin

__all__ = ["LocalSourcePlugin", "cortex_register_sources"]


@hookimpl
def cortex_register_sources(register: Callable[[SourcePlugin], None]) -> None:
    register(LocalSourcePlugin())
