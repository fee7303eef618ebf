"""Fixtures for gateway tests: a real fleet on loopback (see cortex.testing.cluster)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cortex.testing.cluster import Fleet
from cortex.testing.registry import start_registry


@pytest.fixture(scope="session")
def three_neurons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Registry + neurons n1, n2, n3 (1000 MB CPU budget each), shared by the session."""
    tmp = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(tmp, start_registry(tmp / "repos"))
    try:
        fleet.start_neurons(n1=1000, n2=1000, n3=1000)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def fleet(three_neurons: Fleet) -> Iterator[Fleet]:
    """The shared three neurons, emptied after each test; gateways started are stopped."""
    yield three_neurons
    for server in three_neurons.gateways:
        server.stop()
    three_neurons.gateways.clear()
    three_neurons.unload_everything()
