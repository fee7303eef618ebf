"""schemathesis against the gateway's and the neuron's own OpenAPI documents, over real HTTP.

Every operation gets a bounded number of generated requests, valid and invalid (schemathesis
mutates bodies away from the schema too); each answer must not be a 5xx, and every error must be
in its route's envelope. The budget is small so this runs in CI in seconds, derandomized (the
root conftest's ``ci`` profile: the same examples every run); ``make fuzz`` draws random ones,
many more. What a run has found is kept as explicit cases: the model ids in
``test_bad_input.py::UNEXPRESSIBLE_IDS`` (``huggingface:0/{`` on ``POST /models/load``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from cortex.testing.fuzz import examples

from .conftest import ECHO, load

EXAMPLES_PER_OPERATION = 15
# Bodies that follow the schema, and bodies mutated away from it.
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# Routes not worth fuzzing here: metrics text and routes that change the fleet's state for
# every later example (release-memory is harmless, but only meaningful when idle).
SKIPPED = {("GET", "/metrics")}


@pytest.fixture(scope="module")
def apps(module_parts) -> Iterator[dict[str, tuple[str, dict[str, Any]]]]:
    """name -> (base url, OpenAPI document) for a gateway and its neuron."""
    neuron = module_parts.neuron("n1")
    load(neuron.url, ECHO)
    gateway = module_parts.gateway({"n1": neuron.url})
    yield {
        "gateway": (gateway.url, gateway.server.app.openapi()),
        "neuron": (neuron.url, neuron.server.app.openapi()),
    }


def check_answer(status: int, body: bytes, path: str) -> None:
    assert status < 500, (path, status, body[:300])
    if status < 400:
        return
    assert b"Traceback" not in body
    data = httpx.Response(status, content=body).json()
    if path.startswith("/v1/messages"):
        assert data["type"] == "error" and isinstance(data["error"]["message"], str), data
    else:
        error = data["error"]
        assert isinstance(error["message"], str) and isinstance(error["code"], str), data


@pytest.mark.parametrize("name", ["gateway", "neuron"])
def test_no_5xx_and_an_envelope_on_every_error(apps, name: str) -> None:
    base_url, document = apps[name]
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = 0
    for operation, mode in itertools.product(operations, MODES):
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue

        @settings(
            max_examples=examples(EXAMPLES_PER_OPERATION),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(base_url=base_url, timeout=30)
            check_answer(response.status_code, response.content, case.path)

        try:
            fuzz()
        except Unsatisfiable:  # nothing to mutate (a GET without parameters): positive only
            assert mode == GenerationMode.NEGATIVE
            continue
        fuzzed += 1
    posts = {op.path for op in operations if op.method.upper() == "POST"}
    assert "/v1/chat/completions" in posts and fuzzed >= 6
    # The documents describe the bodies the handlers read (not body-less POSTs).
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "model",
        "messages",
    ]
