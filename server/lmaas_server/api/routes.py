"""The `/v1` routes: thin wrappers around the engine and the meter. Sync handlers run in the threadpool."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from lmaas_protocol import (
    ErrorCode,
    ErrorResponse,
    EvaluateRequest,
    EvaluateResponse,
    HealthResponse,
    InputsResponse,
    InputsSpec,
    LayerStdRequest,
    LayerStdResponse,
    ModelInfo,
    TokenizeRequest,
    TokenizeResponse,
    UsageResponse,
    __version__,
)
from lmaas_server import metrics
from lmaas_server.api.bodies import body_schema, parse_body
from lmaas_server.api.deps import AccountDep, EngineDep, KeyDep, MeterDep, RequestIdDep
from lmaas_server.errors import APIError

router = APIRouter(prefix="/v1")

# Valid on any served model: {mask} ends the template (as causal LMs need), label ids 1 and 2 exist in
# every vocabulary, and the empty candidate is the manual prompt.
INPUTS_EXAMPLE = {
    "template": "{text_a} It was{mask}",
    "examples": [{"text_a": "a fun film", "label": 0}, {"text_a": "a dull film", "label": 1}],
    "verbalizer": [[1], [2]],
}
EVALUATE_EXAMPLE = {**INPUTS_EXAMPLE, "candidates": [{}]}

# The error statuses each route can answer (all in the ErrorResponse shape); 500 and 503 (model loading,
# shutting down) anywhere. A key: 401 missing/unknown, 403 revoked/expired, 429 rate limited.
KEYED = (401, 403, 429)
BODY = (400, 413, 422)  # malformed, too large, invalid fields
STATUSES = {
    "health": (),
    "model": KEYED,
    "tokenize": (*KEYED, *BODY),
    "register_inputs": (*KEYED, *BODY, 415),
    "delete_inputs": (*KEYED, 404),
    "evaluate": (*KEYED, *BODY, 402, 404, 409, 410, 415, 504),
    "layer_std": (*KEYED, *BODY, 402, 404, 409, 410, 504),
    "usage": (*KEYED, 404),
    "deploy": (*KEYED, *BODY, 415),
    "list_prompts": KEYED,
    "get_prompt": (*KEYED, 404),
    "delete_prompt": (*KEYED, 404),
    "classify": (*KEYED, *BODY, 402, 404, 409, 504),
}


def documented(route: str) -> dict:
    """`responses=` of a route: its error statuses, each with the ErrorResponse body."""
    return {status: {"model": ErrorResponse} for status in sorted({*STATUSES[route], 500, 503})}


service_router = APIRouter(tags=["service"])


def owner(key) -> str | None:
    """Registered inputs belong to the key that registered them (shared on a server without keys)."""
    return key.prefix if key is not None else None


@router.get(
    "/health",
    responses=documented("health"),
    tags=["service"],
    summary="Liveness and whether the model is loaded (no key needed)",
)
def health(engine: EngineDep) -> HealthResponse:
    return HealthResponse(status="ok", model_loaded=True, model=engine.info.name, version=__version__)


@router.get(
    "/model",
    responses=documented("model"),
    tags=["model"],
    summary="The served model: family, sizes, embedding and layer stds, limits",
)
def model_info(engine: EngineDep, key: KeyDep) -> ModelInfo:
    return engine.info


@router.post(
    "/tokenize",
    responses=documented("tokenize"),
    tags=["model"],
    summary="Texts to token ids (the client needs no tokenizer; free)",
)
def tokenize(request: TokenizeRequest, engine: EngineDep, key: KeyDep) -> TokenizeResponse:
    return engine.tokenize(request)


@router.post(
    "/inputs",
    responses=documented("register_inputs"),
    tags=["inputs"],
    status_code=201,
    summary="Register an example set once; evaluate requests then reference its handle (free)",
    openapi_extra=body_schema(InputsSpec, INPUTS_EXAMPLE),
)
async def register_inputs(request: Request, engine: EngineDep, key: KeyDep) -> InputsResponse:
    spec = await parse_body(request, InputsSpec)
    return await run_in_threadpool(engine.register_inputs, spec, owner(key))


@router.delete(
    "/inputs/{handle}",
    responses=documented("delete_inputs"),
    tags=["inputs"],
    status_code=204,
    summary="Forget a registered example set",
)
def delete_inputs(handle: str, engine: EngineDep, key: KeyDep) -> Response:
    engine.inputs.delete(handle, owner(key))
    return Response(status_code=204)


@router.post(
    "/evaluate",
    responses=documented("evaluate"),
    tags=["model"],
    summary="Score candidate prompts on a batch of examples",
    description=(
        "Renders every example through the template, fills the {prompt} slot with each candidate (soft, deep, "
        "discrete, DePT offsets; raw or server-side projected), and returns per candidate the label-word logits "
        "[examples, classes], the mean cross-entropy and the accuracy (with labels). Charges one call per "
        "candidate. Nothing else leaves the server. JSON or application/x-lmaas-bundle bodies. A retry with the "
        "same Idempotency-Key returns the first response and is not charged again."
    ),
    openapi_extra=body_schema(EvaluateRequest, EVALUATE_EXAMPLE),
)
async def evaluate(
    request: Request, engine: EngineDep, account: AccountDep, request_id: RequestIdDep
) -> EvaluateResponse:
    body = await parse_body(request, EvaluateRequest)
    return await run_in_threadpool(engine.evaluate, body, account, request_id, account.owner)


@router.post(
    "/layer_std",
    responses=documented("layer_std"),
    tags=["model"],
    summary="Per-layer hidden-state std on registered inputs (1 call)",
    description="A retry with the same Idempotency-Key returns the first response and is not charged again.",
)
def layer_std(request: LayerStdRequest, engine: EngineDep, account: AccountDep) -> LayerStdResponse:
    return engine.measure_layer_std(request, account, account.owner)


@router.get(
    "/usage", responses=documented("usage"), tags=["metering"], summary="Your key's budget, usage and recent requests"
)
def usage(meter: MeterDep, key: KeyDep) -> UsageResponse:
    if key is None:
        raise APIError(ErrorCode.NOT_FOUND, "usage is per API key; this server runs without keys")
    return meter.usage(key)


@service_router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def prometheus_metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
