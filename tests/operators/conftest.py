"""Real parts on loopback for the operator tests: an in-suite registry, two ``neuron run``
processes and gateways in this process (cortex.testing.cluster), plus the gateway's metrics app
served on a port of its own, as ``cortex serve`` does."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.testing.metrics import Exposition
from cortex.testing.registry import start_registry
from cortex.testing.servers import UvicornThread


@pytest.fixture(scope="session")
def two_neurons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Registry + neurons n1, n2 (1000 MB CPU budget each), shared by the session."""
    tmp = tmp_path_factory.mktemp("ops-fleet")
    fleet = Fleet(tmp, start_registry(tmp / "repos"))
    try:
        fleet.start_neurons(n1=1000, n2=1000)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def fleet(two_neurons: Fleet) -> Iterator[Fleet]:
    """The shared neurons, emptied after each test; gateways started are stopped."""
    yield two_neurons
    for server in two_neurons.gateways:
        server.stop()
    two_neurons.gateways.clear()
    two_neurons.unload_everything()


def metrics_app(registry: CollectorRegistry) -> Starlette:
    """``GET /metrics`` for ``registry`` (what ``cortex serve`` exposes on metrics_listen)."""

    async def scrape(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", scrape)])


class MetricsEndpoint:
    """A gateway's registry served over HTTP; :meth:`scrape` parses what a Prometheus sees."""

    def __init__(self, gw: GatewayUnderTest) -> None:
        self.server = UvicornThread(metrics_app(gw.gateway.metrics.registry))
        self.server.start()

    @property
    def url(self) -> str:
        return f"{self.server.url}/metrics"

    def scrape(self) -> Exposition:
        answer = httpx.get(self.url, timeout=10)
        assert answer.status_code == 200
        return Exposition(answer.text)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def metrics_of() -> Iterator[type[MetricsEndpoint]]:
    started: list[MetricsEndpoint] = []

    def start(gw: GatewayUnderTest) -> MetricsEndpoint:
        endpoint = MetricsEndpoint(gw)
        started.append(endpoint)
        return endpoint

    yield start  # type: ignore[misc]
    for endpoint in started:
        endpoint.stop()
