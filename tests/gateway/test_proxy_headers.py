"""Pure parts of the proxy: header filtering and the model-field rewrite."""

from __future__ import annotations

from cortex.gateway.proxy import ModelRewriter, downstream_headers, upstream_request_headers


def test_hop_by_hop_headers_are_not_forwarded_upstream() -> None:
    headers = upstream_request_headers(
        {
            "Host": "gateway:31313",
            "Connection": "keep-alive, X-Per-Hop",
            "X-Per-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "Transfer-Encoding": "chunked",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic x",
            "Content-Length": "12",
            "Accept-Encoding": "gzip",
            "X-Request-Id": "abc",
            "Accept": "text/event-stream",
        }
    )
    assert headers == {
        "X-Request-Id": "abc",
        "Accept": "text/event-stream",
        "content-type": "application/json",
    }


def test_hop_by_hop_headers_are_not_forwarded_downstream() -> None:
    headers = downstream_headers(
        {
            "content-type": "text/event-stream",
            "retry-after": "7",
            "connection": "close, x-hop",
            "x-hop": "1",
            "transfer-encoding": "chunked",
            "content-length": "99",
            "date": "x",
            "server": "uvicorn",
            "x-request-id": "abc",
        }
    )
    assert headers == {
        "content-type": "text/event-stream",
        "retry-after": "7",
        "x-request-id": "abc",
    }


def test_model_rewrite_only_touches_the_canonical_model_field() -> None:
    rewrite = ModelRewriter("huggingface:acme/m", 'fast "one"')
    frame = (
        b'data: {"id":"x","model":"huggingface:acme/m","choices":[{"delta":{"content":'
        b'"\\"model\\":\\"huggingface:acme/m\\""}}]}\n\n'
    )
    out = rewrite(frame)
    assert out.startswith(b'data: {"id":"x","model":"fast \\"one\\"","choices"')
    assert out.endswith(b'"\\"model\\":\\"huggingface:acme/m\\""}}]}\n\n')  # content untouched
    spaced = b'{"model": "huggingface:acme/m", "object": "chat.completion"}'
    assert rewrite(spaced) == b'{"model":"fast \\"one\\"", "object": "chat.completion"}'
    same = ModelRewriter("huggingface:acme/m", "huggingface:acme/m")
    assert not same.active and same(frame) is frame


def test_model_rewrite_handles_the_neurons_spelling_and_any_other() -> None:
    rewrite = ModelRewriter("huggingface:acme/m", "m")
    usual = b'data: {"id": "x", "model": "huggingface:acme/m", "choices": []}\n\n'
    assert rewrite(usual) == b'data: {"id": "x", "model":"m", "choices": []}\n\n'
    odd = b'{"model" :\t"huggingface:acme/m", "x": {"model": "huggingface:acme/m"}}'
    assert rewrite(odd) == b'{"model":"m", "x": {"model":"m"}}'
    other = b'{"model": "huggingface:acme/other"}'
    assert rewrite(other) == other
