"""Bad input gets a 4xx in the route's envelope, never a 5xx or a traceback, and the servers
keep serving: the gateway (both dialects) and the neuron, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.testing.fuzz import examples

from .conftest import ECHO, load

HELLO = [{"role": "user", "content": "hello"}]
FIFTY_MB = 50 * 2**20
TRAVERSAL_IDS = [
    "../../etc/passwd",
    "huggingface:../../etc/passwd",
    "acme/../../../etc",
    "acme/..",
    "../acme",
    "/etc/passwd",
    "acme\\..\\..\\x",
    "acme/name\x00",
    "acme/na\nme",
    "huggingface:/abs/path",
    "C:\\Windows/system",
]


@pytest.fixture(scope="module")
def servers(module_parts) -> Iterator[tuple[str, str]]:
    """(gateway url, neuron url) with the echo model loaded; a 1 MiB body limit on both."""
    neuron = module_parts.neuron("n1", max_body_bytes=2**20)
    load(neuron.url, ECHO)
    gateway = module_parts.gateway({"n1": neuron.url}, max_body_bytes=2**20)
    yield gateway.url, neuron.url


def assert_envelope(answer: httpx.Response, dialect: str = "openai") -> dict[str, Any]:
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    assert "Traceback" not in answer.text
    body = answer.json()
    if dialect == "anthropic":
        assert body["type"] == "error", body
        assert isinstance(body["error"]["type"], str) and body["error"]["message"], body
    else:
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], body
        assert isinstance(error["type"], str) and isinstance(error["code"], str), body
    return body


def still_serving(gateway: str, neuron: str) -> None:
    good = {"model": ECHO, "messages": HELLO}
    for url in (gateway, neuron):
        answer = httpx.post(f"{url}/v1/chat/completions", json=good, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "hello"


def raw_post(url: str, content: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
    return httpx.post(
        url, content=content, headers={"content-type": "application/json", **headers}, timeout=60
    )


def nested(depth: int) -> bytes:
    return b'{"model": "x", "messages": ' + b"[" * depth + b"]" * depth + b"}"


BAD_BODIES: dict[str, bytes] = {
    "malformed": b'{"model": "x", "messages": [',
    "not an object": b"[1, 2, 3]",
    "empty": b"",
    "invalid utf-8": b'{"model": "\xff\xfe\xfa", "messages": []}',
    "deeply nested": nested(100_000),
    "model of the wrong type": json.dumps({"model": 5, "messages": HELLO}).encode(),
    "messages missing": json.dumps({"model": ECHO}).encode(),
    "messages a string": json.dumps({"model": ECHO, "messages": "hello"}).encode(),
    "negative max_tokens": json.dumps(
        {"model": ECHO, "messages": HELLO, "max_tokens": -5}
    ).encode(),
    "max_tokens a string": json.dumps(
        {"model": ECHO, "messages": HELLO, "max_tokens": "ten"}
    ).encode(),
    "temperature 1e9": json.dumps({"model": ECHO, "messages": HELLO, "temperature": 1e9}).encode(),
    "temperature NaN": b'{"model": "%s", "messages": [], "temperature": NaN}' % ECHO.encode(),
    "unknown role": json.dumps(
        {"model": ECHO, "messages": [{"role": "wizard", "content": "hi"}]}
    ).encode(),
    "message not an object": json.dumps({"model": ECHO, "messages": [42]}).encode(),
    "100k messages": json.dumps(
        {"model": ECHO, "messages": [{"role": "user", "content": "x"}] * 100_000}
    ).encode(),
    "stream not a boolean": json.dumps(
        {"model": ECHO, "messages": HELLO, "stream": "yes"}
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_chat_bodies_get_a_4xx_envelope(servers, case: str) -> None:
    gateway, neuron = servers
    for url in (gateway, neuron):
        answer = raw_post(f"{url}/v1/chat/completions", BAD_BODIES[case])
        assert_envelope(answer)


@pytest.mark.parametrize("case", ["malformed", "invalid utf-8", "deeply nested", "not an object"])
def test_bad_bodies_on_messages_get_the_anthropic_envelope(servers, case: str) -> None:
    gateway, _neuron = servers
    assert_envelope(raw_post(f"{gateway}/v1/messages", BAD_BODIES[case]), "anthropic")


def test_oversized_bodies_get_413_before_being_read(servers) -> None:
    gateway, neuron = servers
    for url, dialect in (
        (f"{gateway}/v1/chat/completions", "openai"),
        (f"{gateway}/v1/messages", "anthropic"),
        (f"{gateway}/admin/models/load", "openai"),
        (f"{neuron}/v1/chat/completions", "openai"),
        (f"{neuron}/models/load", "openai"),
    ):
        # Declared size over the limit: refused from the headers.
        answer = raw_post(url, b"x" * FIFTY_MB)
        assert answer.status_code == 413
        body = assert_envelope(answer, dialect)
        if dialect == "anthropic":
            assert body["error"]["type"] == "request_too_large"
        else:
            assert body["error"]["code"] == "request_too_large"

        if url.endswith("/v1/messages"):
            continue  # a chunked body is only counted on a route that reads it
        # Chunked (no Content-Length): counted as it arrives and cut at the limit.

        def chunks() -> Iterator[bytes]:
            for _ in range(FIFTY_MB // 2**16):
                yield b" " * 2**16

        try:
            answer = raw_post(url, chunks())
        except httpx.HTTPError:  # the server may close before the client finished sending
            continue
        assert answer.status_code == 413
        assert_envelope(answer, dialect)
        # The rest of the body is unread: the connection must not be reused (issue 22: the
        # FastAPI routes, /admin/models/load among them, did not say so).
        assert answer.headers.get("connection") == "close", (url, dict(answer.headers))
    still_serving(gateway, neuron)


@pytest.mark.parametrize("model_id", TRAVERSAL_IDS)
def test_model_ids_that_escape_a_cache_dir_are_refused(servers, model_id: str) -> None:
    gateway, neuron = servers
    for path in ("/models/load", "/models/estimate", "/models/unload"):
        answer = httpx.post(f"{neuron}{path}", json={"model_id": model_id}, timeout=30)
        body = assert_envelope(answer)
        assert answer.status_code in (400, 404), body
    chat = {"model": model_id, "messages": HELLO}
    answer = httpx.post(f"{gateway}/v1/chat/completions", json=chat, timeout=30)
    assert answer.status_code in (400, 404), answer.text
    assert_envelope(answer)


def test_servers_keep_serving_after_every_bad_input(servers) -> None:
    gateway, neuron = servers
    for body in BAD_BODIES.values():
        raw_post(f"{gateway}/v1/chat/completions", body)
        raw_post(f"{neuron}/v1/completions", body)
    still_serving(gateway, neuron)


# ---- property-based: any JSON body ------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "developer", "wizard", ""])
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles | json_values, "content": st.text(max_size=30) | json_values}
    ),
    max_size=4,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([ECHO, "acme/echo", "nobody/knows", "../x"]) | json_values,
        "messages": messages | json_values,
        "max_tokens": st.integers(-10, 5000) | json_values,
        "temperature": st.floats(-1e12, 1e12) | json_values,
        "top_p": st.floats(-2, 2) | json_values,
        "stop": st.text(max_size=5) | json_values,
        "stream": st.booleans() | json_values,
        "seed": st.integers() | json_values,
        "tools": json_values,
    },
)


@settings(
    max_examples=examples(60),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=chat_bodies, target=st.sampled_from(["gateway", "neuron"]))
def test_any_json_body_gets_an_answer_or_a_4xx_envelope(servers, body, target: str) -> None:
    gateway, neuron = servers
    url = gateway if target == "gateway" else neuron
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    if answer.status_code == 200:
        return
    assert_envelope(answer)


# ---- lone surrogates (issue 22) ---------------------------------------------------------------

# Valid JSON whose strings are not valid Unicode: a \uD800-\uDFFF escape without its pair.
# Python's json module accepts them, and every later .encode("utf-8") (a tokenizer, a response
# body) raised UnicodeEncodeError: a 500 on every non-streamed generation route.
SURROGATE_BODIES: dict[str, tuple[str, bytes]] = {
    "chat content": (
        "/v1/chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
    ),
    "chat content, low half alone": (
        "/v1/chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": "\\uDC00"}]}',
    ),
    "chat model": ("/v1/chat/completions", b'{"model": "%s\\ud800", "messages": []}'),
    "chat key": (
        "/v1/chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi", "\\udbff": 1}]}',
    ),
    "completions prompt": ("/v1/completions", b'{"model": "%s", "prompt": "x\\ud83d"}'),
    "messages": (
        "/v1/messages",
        b'{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", "content": "\\ude00"}]}',
    ),
    "responses": ("/v1/responses", b'{"model": "%s", "input": "a\\ud800"}'),
}


@pytest.mark.parametrize("case", sorted(SURROGATE_BODIES))
@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogates_are_a_400_not_a_500(servers, case: str, stream: bool) -> None:
    gateway, neuron = servers
    route, template = SURROGATE_BODIES[case]
    body = template % ECHO.encode()
    if stream:
        body = body[:-1] + b', "stream": true}'
    targets = [(gateway, "anthropic" if route == "/v1/messages" else "openai")]
    if route in ("/v1/chat/completions", "/v1/completions"):
        targets.append((neuron, "openai"))
    for url, dialect in targets:
        answer = raw_post(f"{url}{route}", body)
        assert answer.status_code == 400, (url, answer.status_code, answer.text[:300])
        error = assert_envelope(answer, dialect)["error"]
        assert "surrogate" in error["message"], error
        if dialect == "openai":
            assert error["code"] == "invalid_json", error
    still_serving(gateway, neuron)


def test_a_surrogate_pair_is_one_character_and_is_served(servers) -> None:
    """An escaped pair (what json.dumps writes for an emoji) is valid and must still work."""
    gateway, neuron = servers
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud83d\\ude00b"}]}'
    for url in (gateway, neuron):
        answer = raw_post(f"{url}/v1/chat/completions", body % ECHO.encode())
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "a\U0001f600b"


def chat_body(content: str, stream: bool) -> str:
    """A chat body for the echo model whose user content is the JSON text ``content``."""
    more = ', "stream": true' if stream else ""
    return f'{{"model": "{ECHO}", "messages": [{{"role": "user", "content": {content}}}]{more}}}'


# json.loads(bytes) guesses UTF-16/32, so an escape in such a body was invisible to the byte
# check, and it decodes UTF-8 with surrogatepass, so an encoded surrogate needed no escape at all
NOT_UTF8_BODIES: dict[str, Callable[[bool], bytes]] = {
    "utf-16": lambda stream: chat_body('"a\\ud800b"', stream).encode("utf-16"),
    "utf-32": lambda stream: chat_body('"a\\ud800b"', stream).encode("utf-32"),
    "utf-16 without surrogate": lambda stream: chat_body('"ab"', stream).encode("utf-16"),
    "utf-8 bytes of a surrogate": lambda stream: chat_body('"a\ud800b"', stream).encode(
        "utf-8", "surrogatepass"
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_UTF8_BODIES))
@pytest.mark.parametrize("stream", [False, True])
def test_bodies_that_are_not_utf8_are_a_400(servers, case: str, stream: bool) -> None:
    """JSON on the wire is UTF-8 (RFC 8259): a UTF-16/32 body, or UTF-8 bytes encoding half a
    surrogate pair, is a 400 at the gateway and the neuron (at the neuron it was a 500 whole
    and a 200 stream: the surrogate check never saw it)."""
    gateway, neuron = servers
    body = NOT_UTF8_BODIES[case](stream)
    for url in (gateway, neuron):
        answer = raw_post(f"{url}/v1/chat/completions", body)
        assert answer.status_code == 400, (url, answer.status_code, answer.text[:300])
        error = assert_envelope(answer)["error"]
        assert error["code"] == "invalid_json" and "UTF-8" in error["message"], error
    still_serving(gateway, neuron)


def test_a_utf8_body_with_a_byte_order_mark_is_served(servers) -> None:
    gateway, neuron = servers
    body = b'\xef\xbb\xbf{"model": "%s", "messages": [{"role": "user", "content": "hello"}]}'
    for url in (gateway, neuron):
        answer = raw_post(f"{url}/v1/chat/completions", body % ECHO.encode())
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "hello"


# ---- ids a registry cannot express (issue 22) -------------------------------------------------

# Each was accepted by the id grammar and failed at the registry client instead; the first is
# what schemathesis drew on the neuron (503 fetch_failed with Retry-After: a lottery in CI).
UNEXPRESSIBLE_IDS = {
    "huggingface:0/{": "invalid_repo_name",
    "acme/x{}": "invalid_repo_name",
    "acme/%2e%2e": "invalid_repo_name",
    "acme/\uff0e\uff0e": "invalid_repo_name",
    "acme/a/b": "name_contains_slash",
    "acme/echo@main": "invalid_repo_name",
    "acme/x--y": "invalid_repo_name",
    "acme/.hidden": "invalid_repo_name",
    "acme/" + "n" * 97: "invalid_repo_name",
}


@pytest.mark.parametrize("model_id", sorted(UNEXPRESSIBLE_IDS))
def test_ids_a_registry_cannot_express_are_a_400_of_their_kind_everywhere(
    servers, model_id: str
) -> None:
    gateway, neuron = servers
    code = UNEXPRESSIBLE_IDS[model_id]
    answers: list[tuple[str, httpx.Response]] = []
    for path in ("/models/load", "/models/estimate", "/models/unload"):
        answers.append((path, httpx.post(f"{neuron}{path}", json={"model_id": model_id})))
    chat = {"model": model_id, "messages": HELLO}
    answers.append(("neuron chat", httpx.post(f"{neuron}/v1/chat/completions", json=chat)))
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"model": model_id, "prompt": "x"}),
        ("/v1/responses", {"model": model_id, "input": "x"}),
        ("/admin/models/load", {"model": model_id}),
        ("/admin/models/unload", {"model": model_id}),
    ):
        answers.append((path, httpx.post(f"{gateway}{path}", json=body, timeout=30)))
    for where, answer in answers:
        assert answer.status_code == 400, (where, answer.status_code, answer.text[:300])
        error = assert_envelope(answer)["error"]
        assert error["code"] == code and "Retry-After" not in answer.headers, (where, error)
    messages = {"model": model_id, "max_tokens": 8, "messages": HELLO}
    answer = httpx.post(f"{gateway}/v1/messages", json=messages, timeout=30)
    assert answer.status_code == 400, answer.text
    assert assert_envelope(answer, "anthropic")["error"]["type"] == "invalid_request_error"
