"""Keep every source test away from the real caches and tokens of whoever runs the suite (the
shared fixture: cortex.testing.source_isolation)."""

from cortex.testing.source_isolation import isolated_source_caches

__all__ = ["isolated_source_caches"]
