"""cortex-source-helexa: the ``helexa`` scheme (HF wire format, own endpoint, token, cache)."""

from __future__ import annotations

from collections.abc import Callable

from cortex.hookspecs import hookimpl
from cortex.source import SourcePlugin
from cortex_source_helexa.plugin import HelexaSourcePlugin


@hookimpl
def cortex_register_sources(register: Callable[[SourcePlugin], None]) -> None:
    register(HelexaSourcePlugin())
