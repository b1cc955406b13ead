"""The deployed-prompt routes: store a tuned prompt once (`/v1/prompts`), classify texts with it by id
(`/v1/classify`). Thin: the checks and the classification are the engine's (engine/deployed.py), the
storage the metering database's (metering/prompt_store.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from lmaas_protocol import ClassifyRequest, ClassifyResponse, PromptInfo, PromptList, PromptSpec
from lmaas_server.api.bodies import body_schema, parse_body
from lmaas_server.api.deps import AccountDep, EngineDep, KeyDep, PromptsDep, RequestIdDep, owner_id
from lmaas_server.api.routes import documented
from lmaas_server.engine import deployed

router = APIRouter(prefix="/v1", tags=["prompts"])

# Valid on any served model, as the evaluate example: {mask} ends the template, ids 1 and 2 exist everywhere.
PROMPT_EXAMPLE = {"name": "reviews", "candidate": {}, "template": "{text_a} It was{mask}",
                  "verbalizer": [[1], [2]], "labels": ["negative", "positive"]}  # fmt: skip

CHARGING = (
    "Charged one call per text (its rendered tokens count against a token budget), whatever the batch: "
    "classification work grows with the texts, so, as a classification provider does, the price is per item. "
    "(Evaluate charges one call per candidate per request, the accounting of a tuning budget.) Nothing is "
    "charged for a request refused before the model runs: an unknown or another key's prompt (404), an "
    "empty or over-long text, too many texts (422). A retry with the same Idempotency-Key returns the first "
    "response and is not charged again."
)


@router.post(
    "/prompts",
    status_code=201,
    responses=documented("deploy"),
    summary="Deploy a tuned prompt: stored for your key, checked against the served model (free)",
    description=(
        "Stores the candidate (any form POST /v1/evaluate accepts, JSON or application/x-lmaas-bundle), its "
        "template, verbalizer with a name per class, and an optional calibration, and returns its id. A prompt "
        "that does not fit the served model (tensor widths, token ids, layers, template) is a 422 naming the "
        "field. The same prompt deployed again by the same key gets the same id."
    ),
    openapi_extra=body_schema(PromptSpec, PROMPT_EXAMPLE),
)
async def deploy(request: Request, engine: EngineDep, key: KeyDep, prompts: PromptsDep) -> PromptInfo:
    spec = await parse_body(request, PromptSpec)
    return await run_in_threadpool(deployed.deploy, engine, prompts, spec, owner_id(key))


@router.get("/prompts", responses=documented("list_prompts"), summary="Your key's deployed prompts")
def list_prompts(key: KeyDep, prompts: PromptsDep) -> PromptList:
    return PromptList(prompts=prompts.list(owner_id(key)))


@router.get("/prompts/{prompt_id}", responses=documented("get_prompt"), summary="One of your deployed prompts")
def get_prompt(prompt_id: str, key: KeyDep, prompts: PromptsDep) -> PromptInfo:
    return prompts.info(owner_id(key), prompt_id)


@router.delete(
    "/prompts/{prompt_id}", status_code=204, responses=documented("delete_prompt"), summary="Delete a deployed prompt"
)
def delete_prompt(prompt_id: str, key: KeyDep, prompts: PromptsDep) -> Response:
    prompts.delete(owner_id(key), prompt_id)
    return Response(status_code=204)


@router.post(
    "/classify",
    responses=documented("classify"),
    summary="Classify texts with a deployed prompt: a label and class probabilities per text",
    description=(
        "Renders each text through the prompt's template, scores the prompt on them and returns per text the "
        "most probable label and the probability of every class (calibrated when the prompt carries a "
        f"calibration). {CHARGING}"
    ),
)
def classify(
    body: ClassifyRequest,
    engine: EngineDep,
    account: AccountDep,
    key: KeyDep,
    prompts: PromptsDep,
    request_id: RequestIdDep,
) -> ClassifyResponse:
    return engine.classifier.classify(prompts, body, account, owner_id(key), request_id)
