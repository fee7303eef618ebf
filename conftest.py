"""Root conftest: shared fixtures for core and every plugin's tests."""

pytest_plugins = ["cortex.testing.fixtures"]
