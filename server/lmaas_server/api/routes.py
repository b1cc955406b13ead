"""The `/v1` routes: thin wrappers around the engine. Sync handlers run in the threadpool."""

from __future__ import annotations

from fastapi import APIRouter

from lmaas_protocol import (
    ErrorResponse,
    EvaluateRequest,
    EvaluateResponse,
    HealthResponse,
    ModelInfo,
    TokenizeRequest,
    TokenizeResponse,
    __version__,
)
from lmaas_server.api.deps import BudgetDep, EngineDep, RequestIdDep

ERRORS = {status: {"model": ErrorResponse} for status in (400, 402, 404, 413, 422, 500, 503)}
router = APIRouter(prefix="/v1", responses=ERRORS)


@router.get("/health", tags=["service"], summary="Liveness and whether the model is loaded")
def health(engine: EngineDep) -> HealthResponse:
    return HealthResponse(status="ok", model_loaded=True, model=engine.info.name, version=__version__)


@router.get("/model", tags=["model"], summary="The served model: family, sizes, embedding std, limits")
def model_info(engine: EngineDep) -> ModelInfo:
    return engine.info


@router.post("/tokenize", tags=["model"], summary="Texts to token ids (the client needs no tokenizer)")
def tokenize(request: TokenizeRequest, engine: EngineDep) -> TokenizeResponse:
    return engine.tokenize(request)


@router.post(
    "/evaluate",
    tags=["model"],
    summary="Score candidate prompts on a batch of examples",
    description=(
        "Renders every example through the template, fills the {prompt} slot with each candidate, and returns "
        "per candidate the label-word logits [examples, classes], the mean cross-entropy and the accuracy "
        "(with labels). Charges one call per candidate. Nothing else leaves the server."
    ),
)
def evaluate(
    request: EvaluateRequest, engine: EngineDep, budget: BudgetDep, request_id: RequestIdDep
) -> EvaluateResponse:
    return engine.evaluate(request, budget, request_id)
