"""``POST /v1/embeddings``: OpenAI's embeddings request, run on an embedding model.

The inputs (a string, strings, token ids, or lists of token ids) are tokenised and embedded in
one job on the model's device worker: an embedding is one forward pass, so it does not go
through the generation scheduler; it is admitted like any one-job request (``max_queue``).
``dimensions`` shortens each vector to its first ``dimensions`` values and renormalises it
(how Matryoshka-trained models are meant to be shortened; OpenAI's ``text-embedding-3`` does
the same). ``encoding_format: "base64"`` sends each vector as little-endian float32 bytes in
base64, as OpenAI does.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any, cast

import attrs

from cortex.harness import EMBEDDINGS, EmbeddingModel, capabilities_of
from cortex.neuron.generation import run_on_worker
from cortex.neuron.models import ModelEntry
from cortex.wire.errors import ApiError, bad_request

MAX_INPUTS = 2048  # OpenAI's bound on inputs per request


@attrs.frozen
class EmbeddingRequest:
    model: str
    texts: list[str] | None
    token_ids: list[list[int]] | None
    encoding_format: str
    dimensions: int | None

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


def _token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def parse_embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    raw = body.get("input")
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and _token_list(raw):
        token_ids = [list(raw)]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        texts = list(raw)
    elif isinstance(raw, list) and raw and all(_token_list(t) for t in raw):
        token_ids = [list(t) for t in raw]
    else:
        raise bad_request(
            "'input' must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids (none empty)",
            param="input",
        )
    if texts is not None:
        for i, text in enumerate(texts):
            if not text:
                raise bad_request(f"input[{i}] is empty", param=f"input[{i}]")
    n = len(texts if texts is not None else token_ids or [])
    if n > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {n}", param="input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise bad_request("'dimensions' must be a positive integer", param="dimensions")
    return EmbeddingRequest(model, texts, token_ids, encoding, dimensions)


async def embed(entry: ModelEntry, req: EmbeddingRequest) -> dict[str, Any]:
    """The ``list`` of embeddings answer (OpenAI shape) for ``req`` on ``entry``."""
    handle = entry.handle
    if handle is None:
        raise ApiError(503, "model_unloading", f"{entry.id} is being unloaded", retry_after=5)
    if EMBEDDINGS not in capabilities_of(handle):
        raise ApiError(
            400,
            "unsupported_model",
            f"{entry.id} is not an embedding model (it generates text: use /v1/chat/completions)",
            param="model",
        )
    dimensions = int(getattr(handle, "dimensions", 0) or 0)
    if req.dimensions is not None and dimensions and req.dimensions > dimensions:
        raise bad_request(
            f"'dimensions' is {req.dimensions}, but {entry.id} makes vectors of {dimensions}",
            param="dimensions",
        )
    context = entry.context_length or 0
    texts, given = req.texts, req.token_ids

    def job() -> tuple[list[list[float]], int]:
        inputs = given if given is not None else [list(handle.tokenize(t)) for t in texts or []]
        for i, ids in enumerate(inputs):
            if context and len(ids) > context:
                raise ApiError(
                    400,
                    "context_length_exceeded",
                    f"input[{i}] has {len(ids)} tokens; {entry.id} takes at most {context}",
                    param=f"input[{i}]",
                )
        model = cast(EmbeddingModel, handle)  # its capabilities say so
        return model.embed(inputs), sum(len(ids) for ids in inputs)

    entry.begin_request()
    try:
        vectors, tokens = await run_on_worker(entry, job)
    finally:
        entry.end_request()
    if req.dimensions is not None:
        vectors = [_shorten(v, req.dimensions) for v in vectors]
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": entry.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _shorten(vector: list[float], dimensions: int) -> list[float]:
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


__all__ = ["EmbeddingRequest", "embed", "parse_embedding_request"]
