"""Refusals through a real gateway and neuron (issue 19): a wrong key is in the request log and
tells clients not to retry; an image for a text-only model is a typed 400, not dropped."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from cortex.auth import GatewayAuth, KeySet
from cortex.config import (
    CortexConfig,
    Duration,
    GatewaySection,
    ModelProfile,
    ModelsConfig,
    NeuronRef,
)
from cortex.gateway.app import create_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.logging import REQUEST_LOGGER
from cortex.testing.cluster import Fleet
from cortex.testing.servers import UvicornThread

KEY = "ck-refusals"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.fixture
def url(fleet: Fleet) -> Iterator[str]:
    fleet.publish_echo("ref/echo", reply="hi", memory_mb=10)
    config = CortexConfig(
        gateway=GatewaySection(poll_interval=Duration(0.2)),
        neurons=[NeuronRef(name, fleet.neuron_url(name)) for name in fleet.neurons],
    )
    models = ModelsConfig(models=[ModelProfile(id="ref/echo", memory_mb=10)])
    gateway = Gateway(config, models, load_strategy("lru"))
    auth = GatewayAuth(KeySet.from_keys([KEY]), KeySet(), required=True)
    server = UvicornThread(create_app(gateway, auth)).start()
    fleet.gateways.append(server)
    yield server.url


def test_a_wrong_key_is_logged_and_not_worth_retrying(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    for method, path in (("POST", "/v1/messages"), ("GET", "/v1/models")):  # both routers
        answer = httpx.request(method, f"{url}{path}", headers={"x-api-key": "wrong"}, json={})
        assert answer.status_code == 401
        assert answer.headers["x-should-retry"] == "false"
    logged = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    assert [(r.getMessage(), r.fields["http_status"]) for r in logged] == [  # type: ignore[attr-defined]
        ("/v1/messages", 401),
        ("/v1/models", 401),
    ]


def test_an_image_for_a_text_only_model_is_refused(url: str) -> None:
    content = [{"type": "text", "text": "what is this?"}, IMAGE]
    answer = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "ref/echo", "messages": [{"role": "user", "content": content}]},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_content", "messages[0].content[1]")
    assert answer.headers["x-should-retry"] == "false"
