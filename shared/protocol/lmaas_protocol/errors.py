"""Error codes shared by server and client: one code per failure class, each with one HTTP status."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"  # malformed JSON, bad fields, shapes, dtypes, ids, templates
    UNAUTHORIZED = "unauthorized"  # missing or unknown API key
    FORBIDDEN = "forbidden"  # revoked or expired key
    BUDGET_EXHAUSTED = "budget_exhausted"  # not retryable: the call budget cannot cover the request
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # a request with this Idempotency-Key is still in flight; retry later
    GONE = "gone"  # e.g. an evicted cached-input handle
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a body neither JSON nor an lmaas bundle
    RATE_LIMITED = "rate_limited"  # retry after the Retry-After header
    MODEL_NOT_READY = "model_not_ready"  # still loading; retryable
    INTERNAL_ERROR = "internal_error"  # nothing was charged
    TIMEOUT = "timeout"  # the request ran past the server's request timeout; nothing was charged
    SHUTTING_DOWN = "shutting_down"  # the server is stopping; retry (another replica, or after the restart)
    OVERLOADED = "overloaded"  # the accelerator ran out of memory even for this request alone; retry later


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.BUDGET_EXHAUSTED: 402,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.GONE: 410,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.MODEL_NOT_READY: 503,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.OVERLOADED: 503,
}
