"""Exception handlers: every error leaves the server as one `ErrorResponse` body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmaas_protocol import REQUEST_ID_HEADER, ErrorCode, error_message, error_param
from lmaas_server.errors import APIError
from lmaas_server.metering.accounts import Replayed

log = logging.getLogger(__name__)

STARLETTE_CODES = {
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}
NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "missing", "model_type"}


def error_response(request: Request, error: APIError) -> JSONResponse:
    body = error.body(getattr(request.state, "request_id", None))
    headers = dict(error.headers or {})
    if body.error.request_id:  # also set here: Starlette answers 500s outside the request-id middleware
        headers[REQUEST_ID_HEADER] = body.error.request_id
    return JSONResponse(body.model_dump(mode="json"), status_code=error.status, headers=headers)


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request, exc)


async def on_replay(request: Request, exc: Replayed) -> Response:
    """The stored response (or charged error) of the first request with this Idempotency-Key, byte for byte;
    not charged again."""
    return Response(exc.body, status_code=exc.status, media_type="application/json",
                    headers={"Idempotent-Replayed": "true"})  # fmt: skip


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request"}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return error_response(
            request, APIError(ErrorCode.INVALID_REQUEST, f"malformed JSON body: {reason}", status=400)
        )
    if first.get("type") in NOT_AN_OBJECT and tuple(first.get("loc", ())) == ("body",):  # or no JSON content type
        message = f"the request body must be a JSON object sent as application/json ({first.get('msg')})"
        return error_response(request, APIError(ErrorCode.INVALID_REQUEST, message, status=400))
    details = {"errors": [{"param": error_param(e), "message": error_message(e)} for e in errors[:20]]}
    error = APIError(ErrorCode.INVALID_REQUEST, error_message(first), param=error_param(first) or None, details=details)
    return error_response(request, error)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = STARLETTE_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
    return error_response(request, APIError(code, str(exc.detail), status=exc.status_code, headers=exc.headers))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    error = APIError(ErrorCode.INTERNAL_ERROR, f"internal error ({type(exc).__name__}); nothing was charged")
    return error_response(request, error)


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(Replayed, on_replay)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
