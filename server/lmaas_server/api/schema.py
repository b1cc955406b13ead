"""The OpenAPI document, published with the limits this server enforces (its Settings), not the protocol's
outer bounds: a client reading /openapi.json sees the same caps that answer 422."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lmaas_protocol import EvaluateRequest, InputsSpec, PromptSpec
from lmaas_server.api.bodies import component_schemas
from lmaas_server.config import Settings


def openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's schema plus the components of bodies parsed by hand (JSON or bundle, see bodies.py), with
    the server's limits written into them."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(component_schemas(EvaluateRequest, InputsSpec, PromptSpec))
        publish_limits(components, settings)
        publish_rules(components)
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
        ("ClassifyRequest", "texts"): settings.max_classify_texts,
    }


# Rules that span several fields (checked by the protocol's validators and the engine), stated where a
# client reads the schema.
CROSS_FIELD_RULES = {
    "InputsSpec": (
        "The template contains {text_a}, {mask} exactly once (for causal LMs at its end) and {prompt} at "
        "most once; {text_b} only if every example has text_b. Either every example has a label or none "
        "has; labels are below the number of verbalizer classes. Each verbalizer class has 1 to 16 token ids."
    ),
    "EvaluateRequest": (
        "Give either `inputs` (a registered handle) or inline `template`, `examples` and `verbalizer` (the "
        "InputsSpec rules apply), not both; `truncate` only when registering. A candidate with a prompt "
        "needs a {prompt} slot in the template. Within a candidate all prompt tensors are 2-D with P rows "
        "(P = len(prompt_token_ids) when given) and the model's hidden size as columns; embedding_offset.b "
        "has as many rows as embedding_offset.a has columns. A projected tensor's z has the spec's dim; a "
        "named projection must be in `projections`."
    ),
    "PromptSpec": (
        "One name in `labels` per verbalizer class; calibration.bias has one value per class. The candidate "
        "follows the EvaluateRequest rules, checked against the served model at upload (widths equal to its "
        "hidden size, token ids below its vocabulary size, at most its layers, the template rendered with the "
        "prompt); a misfit is a 422 naming the field."
    ),
}


def publish_rules(components: dict[str, Any]) -> None:
    """Cross-field rules in the descriptions; JSON tensors carry `data` (`ref` is for bundle bodies only)."""
    for component, rules in CROSS_FIELD_RULES.items():
        described = components[component]
        described["description"] = f"{described.get('description', '')}\n\n{rules}".strip()
    tensor = components["Tensor"]
    tensor["required"] = sorted({*tensor.get("required", []), "data"})
    tensor["properties"]["ref"]["description"] = "Bundle bodies only: index of the raw buffer (instead of data)."


def publish_limits(components: dict[str, Any], settings: Settings) -> None:
    for (component, name), cap in published_caps(settings).items():
        field = components[component]["properties"][name]
        for variant in field.get("anyOf", [field]):  # optional arrays are anyOf [array, null]
            if variant.get("type") == "array":
                variant["maxItems"] = min(cap, variant.get("maxItems", cap))
    for name in ("text_a", "text_b"):  # the server's text length of classify, below the protocol's
        field = components["ClassifyText"]["properties"][name]
        for variant in field.get("anyOf", [field]):
            if variant.get("type") == "string":
                variant["maxLength"] = min(settings.max_classify_chars, variant.get("maxLength", 1 << 30))
    spec = components["ProjectionSpec"]
    spec["x-max-elements"] = settings.max_projection_elements
    spec["description"] = (
        f"{spec.get('description', '')} This server accepts dim * prod(shape) <= "
        f"{settings.max_projection_elements} elements."
    ).strip()
