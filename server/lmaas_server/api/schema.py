"""The OpenAPI document, published with the limits this server enforces (its Settings), not the protocol's
outer bounds: a client reading /openapi.json sees the same caps that answer 422."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lmaas_protocol import EvaluateRequest, InputsSpec
from lmaas_server.api.bodies import component_schemas
from lmaas_server.config import Settings


def openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's schema plus the components of bodies parsed by hand (JSON or bundle, see bodies.py), with
    the server's limits written into them."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(component_schemas(EvaluateRequest, InputsSpec))
        publish_limits(components, settings)
        app.openapi_schema = schema
    return app.openapi_schema


def published_caps(settings: Settings) -> dict[tuple[str, str], int]:
    """(component, property) -> the largest array the server accepts there (checked in the engine)."""
    return {
        ("TokenizeRequest", "texts"): settings.max_examples,
        ("EvaluateRequest", "candidates"): settings.max_candidates,
        ("EvaluateRequest", "examples"): settings.max_examples,
        ("InputsSpec", "examples"): settings.max_examples,
        ("Candidate", "prompt_token_ids"): settings.max_prompt_length,
    }


def publish_limits(components: dict[str, Any], settings: Settings) -> None:
    for (component, name), cap in published_caps(settings).items():
        field = components[component]["properties"][name]
        for variant in field.get("anyOf", [field]):  # optional arrays are anyOf [array, null]
            if variant.get("type") == "array":
                variant["maxItems"] = min(cap, variant.get("maxItems", cap))
    spec = components["ProjectionSpec"]
    spec["x-max-elements"] = settings.max_projection_elements
    spec["description"] = (
        f"{spec.get('description', '')} This server accepts dim * prod(shape) <= "
        f"{settings.max_projection_elements} elements."
    ).strip()
