"""Request bodies as JSON or as binary bundles (`application/x-lmaas-bundle`: JSON + raw tensor buffers).

FastAPI parses JSON bodies by itself; bundles need their buffers in the validation context, so bodies
that may carry tensors are parsed here and documented in the OpenAPI schema with both media types.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from lmaas_protocol import BUNDLE_MEDIA_TYPE, BundleError, ErrorCode, parse_bundle
from lmaas_server.errors import APIError, InvalidRequest

ModelT = TypeVar("ModelT", bound=BaseModel)
JSON_MEDIA_TYPE = "application/json"


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in (JSON_MEDIA_TYPE, BUNDLE_MEDIA_TYPE):
        raise APIError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"send the body as {JSON_MEDIA_TYPE} or {BUNDLE_MEDIA_TYPE}")
    body = await request.body()
    try:
        if media_type == BUNDLE_MEDIA_TYPE:
            return parse_bundle(body, model)
        return model.model_validate_json(body)
    except BundleError as exc:
        raise InvalidRequest(None, f"malformed bundle body: {exc}", status=400) from None
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def body_schema(model: type[BaseModel], example: dict[str, Any] | None = None) -> dict[str, Any]:
    """`openapi_extra` documenting a body that `parse_body` reads, in both media types, with a valid
    `example` (validated here; the fuzz test sends it, so the model path is exercised too)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # registered as components by the response models and `extra_components`
    json_content: dict[str, Any] = {"schema": schema}
    if example is not None:
        model.model_validate(example)
        json_content["example"] = example
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON_MEDIA_TYPE: json_content,
                BUNDLE_MEDIA_TYPE: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "LMB1 bundle: the same JSON document with tensors as raw buffers (see lmaas_protocol.bundle).",
                },
            },
        }
    }


def component_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """Schemas of `models` and everything they reference, for the OpenAPI components section."""
    components: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return components
