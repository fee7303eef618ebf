"""A neuron with several devices: a model that spans two of them is planned per device,
runs on its primary's worker, reserves the others, and frees them all when unloaded.

The devices are three CPU devices (``cpu``, ``cpu:1``, ``cpu:2``) as a discovery plugin of
another machine would register them, and the harness is the echo harness allowed to span
devices (``max_devices``), recording the devices each load was given; the real split (vLLM
tensor parallel on two CPU ranks) is in plugins/harness_vllm/tests/test_vllm_tensor_parallel.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cortex.testing.devices import SpanningEcho, start_multi_device_neuron
from cortex.testing.registry import RunningRegistry
from tests.neuron.conftest import ECHO_REPLY

MIB = 2**20


@pytest.fixture(scope="module")
def harness() -> SpanningEcho:
    return SpanningEcho()


@pytest.fixture(scope="module")
def server(
    model_registry: RunningRegistry,
    harness: SpanningEcho,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    neuron = start_multi_device_neuron(
        model_registry.url,
        tmp_path_factory.mktemp("cache"),
        {"cpu": 1000, "cpu:1": 1000, "cpu:2": 120},
        [harness],
    )
    yield neuron.url
    neuron.stop()


def post(url: str, path: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def discovery(url: str) -> dict[str, dict[str, Any]]:
    return {d["key"]: d for d in httpx.get(f"{url}/discovery").json()["devices"]}


def test_a_two_device_load_is_planned_per_device_and_reserves_the_secondary(
    server: str, harness: SpanningEcho
) -> None:
    response = post(server, "/models/load", model_id="acme/echo", devices=2, device="cpu")
    assert response.status_code == 200, response.text
    entry = response.json()["model"]
    assert entry["device"] == "cpu"
    assert entry["devices"] == ["cpu", "cpu:1"]  # the freest empty device
    assert harness.loads[-1] == ("cpu", ("cpu", "cpu:1"))
    devices = discovery(server)
    # 64 MiB held (the echo model's size), 32 on each device
    assert devices["cpu"]["free_memory"] == (1000 - 32) * MIB
    assert devices["cpu:1"]["free_memory"] == (1000 - 32) * MIB
    assert devices["cpu:1"]["reserved_by"] == "huggingface:acme/echo"
    assert devices["cpu"]["reserved_by"] is None
    # it serves (on the primary's worker)
    reply = post(
        server,
        "/v1/chat/completions",
        model="acme/echo",
        messages=[{"role": "user", "content": "hi"}],
    )
    assert reply.json()["choices"][0]["message"]["content"] == ECHO_REPLY
    # the secondary takes no other model
    refused = post(server, "/models/load", model_id="acme/slow-echo", device="cpu:1")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "device_reserved"
    # a further two-device load finds one empty device left (cpu:2) and the primary busy
    # devices are not reused as secondaries
    too_many = post(server, "/models/load", model_id="acme/tool-echo", devices=3)
    assert too_many.status_code == 422
    assert too_many.json()["error"]["code"] == "not_enough_devices"
    # unloading frees every device it spanned
    assert post(server, "/models/unload", model_id="acme/echo").status_code == 200
    devices = discovery(server)
    assert devices["cpu:1"]["reserved_by"] is None
    assert devices["cpu:1"]["free_memory"] == 1000 * MIB


def test_each_device_must_hold_its_share(server: str) -> None:
    """The estimate is 300 MiB: over two devices 150 MiB each, more than cpu:2 (120 MiB) has,
    and the error names it; over three, 100 MiB each fits every device."""
    refused = post(server, "/models/load", model_id="acme/echo", devices=2, device="cpu:2")
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert error["details"]["device"] == "cpu:2"
    assert error["details"]["required_bytes"] == 150 * MIB
    fits = post(server, "/models/load", model_id="acme/echo", devices=3)
    assert fits.status_code == 200, fits.text
    assert sorted(fits.json()["model"]["devices"]) == ["cpu", "cpu:1", "cpu:2"]
    # every device is taken: a one-device load may still go to the primary, not elsewhere
    primary = fits.json()["model"]["device"]
    other = post(server, "/models/load", model_id="acme/tool-echo")
    assert other.status_code == 200, other.text
    assert other.json()["model"]["device"] == primary
    assert post(server, "/models/unload", model_id="acme/tool-echo").status_code == 200
    assert post(server, "/models/unload", model_id="acme/echo").status_code == 200


def test_a_harness_that_cannot_span_is_refused(server: str, harness: SpanningEcho) -> None:
    refused = post(server, "/models/load", model_id="acme/echo", devices=5)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "harness_single_device"
