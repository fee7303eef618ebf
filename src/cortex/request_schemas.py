"""OpenAPI request-body schemas for the routes whose handlers read raw JSON.

Why: the gateway and the neuron parse bodies by hand (no pydantic on the hot path), so FastAPI
knows nothing about what they accept and their OpenAPI documents would describe every POST as
body-less. These schemas say what the parsers accept (the parsers stay the authority: a body
the schema allows may still get a typed 400, e.g. a prompt longer than the context). They make
the documents honest for readers and let schemathesis fuzz the real routes
(tests/reliability/test_schemathesis.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

_MODEL = {"type": "string", "minLength": 1, "description": "a model id or an alias"}
_ROLE = {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]}
_CONTENT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "object"}},
        {"type": "null"},
    ]
}
_SAMPLING: dict[str, Any] = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "seed": {"type": "integer"},
    "stop": {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": 16},
        ]
    },
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object"},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "minimum": 0.01, "maximum": 10},
}

CHAT_COMPLETIONS: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": _MODEL,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {"role": _ROLE, "content": _CONTENT},
            },
        },
        "tools": {"type": "array", "items": {"type": "object"}},
        **_SAMPLING,
    },
}

COMPLETIONS: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": _MODEL,
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            ]
        },
        **_SAMPLING,
    },
}

MESSAGES: dict[str, Any] = {
    "type": "object",
    "required": ["model", "max_tokens", "messages"],
    "properties": {
        "model": _MODEL,
        "max_tokens": {"type": "integer", "minimum": 1},
        "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["user", "assistant"]},
                    "content": _CONTENT,
                },
            },
        },
        "stream": {"type": "boolean"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "stop_sequences": {"type": "array", "items": {"type": "string"}},
        "tools": {"type": "array", "items": {"type": "object"}},
    },
}

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}

EMBEDDINGS: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _MODEL,
        "input": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                _TOKEN_IDS,
                {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
            ]
        },
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
    },
}

MODEL_ID = {"type": "string", "minLength": 1, "description": "scheme:org/name or org/name"}

LOAD: dict[str, Any] = {
    "type": "object",
    "required": ["model_id"],
    "properties": {
        "model_id": MODEL_ID,
        "harness": {"type": "string"},
        "quant": {"type": "string"},
        "device": {"type": "string"},
        "context_length": {"type": "integer", "minimum": 1},
    },
}

UNLOAD: dict[str, Any] = {
    "type": "object",
    "required": ["model_id"],
    "properties": {"model_id": MODEL_ID},
}

ESTIMATE: dict[str, Any] = {
    "type": "object",
    "required": ["model_id"],
    "properties": {
        "model_id": MODEL_ID,
        "harness": {"type": "string"},
        "quant": {"type": "string"},
    },
}

TOKENIZE: dict[str, Any] = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": _MODEL,
        "messages": CHAT_COMPLETIONS["properties"]["messages"],
        "prompt": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "object"}},
    },
}

ADMIN_MODEL: dict[str, Any] = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": _MODEL, "node": {"type": "string"}},
}

BY_PATH: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": CHAT_COMPLETIONS,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/messages": MESSAGES,
    "/models/load": LOAD,
    "/models/unload": UNLOAD,
    "/models/estimate": ESTIMATE,
    "/tokenize": TOKENIZE,
    "/admin/models/load": ADMIN_MODEL,
    "/admin/models/unload": ADMIN_MODEL,
}


def document_request_bodies(app: FastAPI, schemas: dict[str, dict[str, Any]] = BY_PATH) -> None:
    """Attach a JSON request-body schema to every POST route of ``app`` listed in ``schemas``.
    Must run before the OpenAPI document is first built (FastAPI caches it)."""
    for route in app.routes:
        if not isinstance(route, APIRoute) or "POST" not in (route.methods or ()):
            continue
        schema = schemas.get(route.path)
        if schema is None:
            continue
        extra = dict(route.openapi_extra or {})
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
        route.openapi_extra = extra
