"""Server-side errors: each carries an ErrorCode and becomes one `ErrorResponse` JSON body."""

from __future__ import annotations

from typing import Any

from lmaas_protocol import HTTP_STATUS, ErrorCode, ErrorDetail, ErrorResponse


class APIError(Exception):
    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status or HTTP_STATUS[code]
        self.details = details
        self.headers = headers

    def body(self, request_id: str | None) -> ErrorResponse:
        """The one error shape every failure leaves the server in."""
        detail = ErrorDetail(
            code=self.code, message=self.message, param=self.param, request_id=request_id, details=self.details
        )
        return ErrorResponse(error=detail)


class InvalidRequest(APIError):
    def __init__(self, param: str | None, message: str, status: int = 422):
        super().__init__(ErrorCode.INVALID_REQUEST, message, param=param, status=status)


class BudgetExhausted(APIError):
    """Not retryable: the remaining budget cannot cover the request; nothing was charged."""

    def __init__(self, requested: int, remaining: int):
        super().__init__(
            ErrorCode.BUDGET_EXHAUSTED,
            f"call budget exhausted: {requested} calls requested, {remaining} remaining",
            details={"requested": requested, "remaining": remaining},
        )


class ModelNotReady(APIError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.MODEL_NOT_READY, "the model is not loaded yet", headers={"Retry-After": "5"})


class Overloaded(APIError):
    """The accelerator ran out of memory for this request's rows even one at a time (after splitting the
    batches it shared with other requests); refunded like every 5xx, retryable."""

    def __init__(self, what: str = "this request") -> None:
        super().__init__(ErrorCode.OVERLOADED, f"the server ran out of accelerator memory for {what}; retry later "
                         "(nothing was charged)", headers={"Retry-After": "5"})  # fmt: skip


class BackendUnavailable(APIError):
    """The inference backend (a vLLM server) did not answer or failed on this request's rows; refunded like
    every 5xx, retryable."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.OVERLOADED, f"the inference backend failed: {reason}; retry later (nothing was "
                         "charged)", status=503, headers={"Retry-After": "5"})  # fmt: skip
