"""Helpers for testing cortex and cortex plugins: real servers on loopback, tiny models.

Importable by third-party plugin test suites too (``pytest_plugins = ["cortex.testing.fixtures"]``).
Nothing here imports torch or transformers at module import.
"""
