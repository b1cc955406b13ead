"""One typed error tree for everything the client can run into.

LMaaSError
├── APIConnectionError          the server could not be reached (retried)
│   └── APITimeoutError         no answer within the timeout (retried)
└── APIStatusError              the server answered with an error (has .status, .code, .param);
    │                           408 and 409 (the same Idempotency-Key still running) are retried
    ├── BadRequestError         400/422: fix the request; never retried
    ├── AuthenticationError     401
    ├── PermissionDeniedError   403
    ├── BudgetExhaustedError    402: the call budget is spent; never retried
    ├── NotFoundError           404/410
    ├── PayloadTooLargeError    413
    ├── RateLimitedError        429: retried after Retry-After
    └── ServerError             5xx: retried
"""

from __future__ import annotations

from typing import Any


class LMaaSError(Exception):
    """Base of every error raised by lmaas_client."""


class APIConnectionError(LMaaSError):
    pass


class APITimeoutError(APIConnectionError):
    pass


class APIStatusError(LMaaSError):
    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ):
        where = f" (param: {param})" if param else ""
        super().__init__(f"{status} {code or 'error'}: {message}{where}")
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.request_id = request_id
        self.details = details or {}
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class BudgetExhaustedError(APIStatusError):
    @property
    def remaining(self) -> int | None:
        return self.details.get("remaining")


class NotFoundError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class RateLimitedError(APIStatusError):
    pass


class ServerError(APIStatusError):
    pass


def error_class(status: int) -> type[APIStatusError]:
    if status in (400, 422):
        return BadRequestError
    if status >= 500:
        return ServerError
    return {
        401: AuthenticationError,
        402: BudgetExhaustedError,
        403: PermissionDeniedError,
        404: NotFoundError,
        410: NotFoundError,
        413: PayloadTooLargeError,
        429: RateLimitedError,
    }.get(status, APIStatusError)
