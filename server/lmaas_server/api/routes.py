"""The `/v1` routes: thin wrappers around the engine. Sync handlers run in the threadpool."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from lmaas_protocol import (
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
    __version__,
)
from lmaas_server.api.bodies import body_schema, parse_body
from lmaas_server.api.deps import BudgetDep, EngineDep, RequestIdDep

ERRORS = {status: {"model": ErrorResponse} for status in (400, 402, 404, 410, 413, 415, 422, 500, 503)}
router = APIRouter(prefix="/v1", responses=ERRORS)


@router.get("/health", tags=["service"], summary="Liveness and whether the model is loaded")
def health(engine: EngineDep) -> HealthResponse:
    return HealthResponse(status="ok", model_loaded=True, model=engine.info.name, version=__version__)


@router.get("/model", tags=["model"], summary="The served model: family, sizes, embedding and layer stds, limits")
def model_info(engine: EngineDep) -> ModelInfo:
    return engine.info


@router.post("/tokenize", tags=["model"], summary="Texts to token ids (the client needs no tokenizer)")
def tokenize(request: TokenizeRequest, engine: EngineDep) -> TokenizeResponse:
    return engine.tokenize(request)


@router.post(
    "/inputs",
    tags=["inputs"],
    status_code=201,
    summary="Register an example set once; evaluate requests then reference its handle",
    openapi_extra=body_schema(InputsSpec),
)
async def register_inputs(request: Request, engine: EngineDep) -> InputsResponse:
    spec = await parse_body(request, InputsSpec)
    return await run_in_threadpool(engine.register_inputs, spec)


@router.delete("/inputs/{handle}", tags=["inputs"], status_code=204, summary="Forget a registered example set")
def delete_inputs(handle: str, engine: EngineDep) -> Response:
    engine.inputs.delete(handle)
    return Response(status_code=204)


@router.post(
    "/evaluate",
    tags=["model"],
    summary="Score candidate prompts on a batch of examples",
    description=(
        "Renders every example through the template, fills the {prompt} slot with each candidate (soft, deep, "
        "discrete, DePT offsets; raw or server-side projected), and returns per candidate the label-word logits "
        "[examples, classes], the mean cross-entropy and the accuracy (with labels). Charges one call per "
        "candidate. Nothing else leaves the server. JSON or application/x-lmaas-bundle bodies."
    ),
    openapi_extra=body_schema(EvaluateRequest),
)
async def evaluate(
    request: Request, engine: EngineDep, budget: BudgetDep, request_id: RequestIdDep
) -> EvaluateResponse:
    body = await parse_body(request, EvaluateRequest)
    return await run_in_threadpool(engine.evaluate, body, budget, request_id)


@router.post("/layer_std", tags=["model"], summary="Per-layer hidden-state std on registered inputs (1 call)")
def layer_std(request: LayerStdRequest, engine: EngineDep, budget: BudgetDep) -> LayerStdResponse:
    return engine.measure_layer_std(request, budget)
