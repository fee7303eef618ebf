"""The generation routes: each path, its dialect, and its answer once the JSON body is read.

One table, served one way: :mod:`cortex.gateway.fast_path` turns each entry into a plain ASGI
endpoint (key check, body limit, JSON body, client watch, error envelope, the request's tally)
that :class:`cortex.gateway.app.GatewayApp` calls ahead of FastAPI. No FastAPI route exists for
these paths; :func:`openapi_paths` describes them in the app's OpenAPI document (for readers and
schemathesis) from the same table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from starlette.responses import Response

from cortex.gateway import dialects
from cortex.gateway.dispatch import Dispatcher
from cortex.gateway.policies import PassThrough
from cortex.gateway.tally import Tally
from cortex.request_schemas import BY_PATH
from cortex.wire.errors import ANTHROPIC, OPENAI, ApiError

# (dispatcher, the request's tally, its JSON body, its headers) -> the answer
Answer = Callable[[Dispatcher, Tally, dict[str, Any], Mapping[str, str]], Awaitable[Response]]


async def openai_answer(
    dispatcher: Dispatcher, tally: Tally, payload: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """OpenAI chat completions, completions and embeddings: proxied to the neuron as they are
    (streams frame by frame), the ``model`` field saying what the client asked for."""
    requested = payload.get("model")
    if not isinstance(requested, str) or not requested:
        raise ApiError(
            400,
            "missing_model_field",
            "the request needs a 'model' field naming a model from GET /v1/models",
            param="model",
        )
    policy = PassThrough(tally.route, payload, requested, tally.metered)
    return await dispatcher.serve(tally, requested, policy, headers)


@attrs.frozen
class GenerationRoute:
    path: str
    dialect: str  # the error envelope: OPENAI or ANTHROPIC
    answer: Answer
    summary: str


GENERATION_ROUTES: tuple[GenerationRoute, ...] = (
    GenerationRoute("/v1/chat/completions", OPENAI, openai_answer, "OpenAI chat completions"),
    GenerationRoute("/v1/completions", OPENAI, openai_answer, "OpenAI completions"),
    GenerationRoute("/v1/embeddings", OPENAI, openai_answer, "OpenAI embeddings"),
    GenerationRoute("/v1/messages", ANTHROPIC, dialects.messages_answer, "Anthropic Messages"),
    GenerationRoute(
        "/v1/messages/count_tokens",
        ANTHROPIC,
        dialects.count_tokens_answer,
        "Anthropic token count",
    ),
    GenerationRoute("/v1/responses", OPENAI, dialects.responses_answer, "OpenAI Responses"),
)


def openapi_paths(
    routes: tuple[GenerationRoute, ...] = GENERATION_ROUTES,
    schemas: Mapping[str, dict[str, Any]] = BY_PATH,
) -> dict[str, Any]:
    """OpenAPI ``paths`` entries for the generation routes (request bodies from
    :mod:`cortex.request_schemas` where one is written down)."""
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": "post" + route.path.replace("/", "_"),
            "responses": {
                "200": {
                    "description": "Successful Response",
                    "content": {"application/json": {"schema": {}}},
                }
            },
        }
        schema = schemas.get(route.path)
        if schema is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        paths[route.path] = {"post": operation}
    return paths
