"""cortex-source-huggingface: the ``huggingface`` scheme, and any mirror that names this plugin.

huggingface_hub is imported inside the source's methods, never here.
"""

from __future__ import annotations

from collections.abc import Callable

from cortex.hookspecs import hookimpl
from cortex.source import SourcePlugin
from cortex_source_huggingface.plugin import HuggingFaceSourcePlugin


@hookimpl
def cortex_register_sources(register: Callable[[SourcePlugin], None]) -> None:
    register(HuggingFaceSourcePlugin())
