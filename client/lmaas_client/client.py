"""`LMaaSClient`: typed access to an lmaas server over HTTP, with timeouts, retries and idempotency keys.

Retries cover connection failures, timeouts, 408, 409 (the first attempt of this Idempotency-Key is still
running on the server), 429 and 5xx, with exponential backoff and jitter, honouring Retry-After (seconds or
an HTTP date). They go on for a time window (`retry_window`, default 120 s, `LMAAS_RETRY_WINDOW_S`) that
outlasts a server restart, so a restarted or briefly unreachable server does not end a tuning run. Every
evaluation carries one Idempotency-Key, reused on its retries, so a retried request is charged once by
servers that meter. Bad requests (400/413/422), missing or refused keys (401/403), an exhausted budget (402)
and unknown resources (404/410) are never retried.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from lmaas_client import errors
from lmaas_protocol import (
    API_PREFIX,
    BUNDLE_MEDIA_TYPE,
    IDEMPOTENCY_HEADER,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyText,
    ErrorResponse,
    EvaluateRequest,
    EvaluateResponse,
    HealthResponse,
    InputsResponse,
    InputsSpec,
    LayerStdRequest,
    LayerStdResponse,
    ModelInfo,
    PromptInfo,
    PromptList,
    PromptSpec,
    TokenizeRequest,
    TokenizeResponse,
    UsageResponse,
    encode_bundle,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
SERVER_ENV, API_KEY_ENV, RETRY_WINDOW_ENV = "LMAAS_SERVER", "LMAAS_API_KEY", "LMAAS_RETRY_WINDOW_S"
# A population of 20 candidates over 32 examples takes ~80 s on a 2-core CPU; test sets take longer.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
# Retries continue for this long after the first failure of a request: a server restart takes ~8 s on a
# CPU with a cached model and ~40 s for a container with a fresh volume, so two minutes ride one out.
DEFAULT_RETRY_WINDOW = 120.0
INITIAL_RETRY_DELAY = 0.5  # seconds; doubles per retry
MAX_RETRY_DELAY = 20.0
RETRY_JITTER = 0.25  # up to 25 % shorter, so clients that failed together do not retry together
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

ResponseT = TypeVar("ResponseT", bound=BaseModel)


class LMaaSClient:
    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_retries: int | None = None,
        retry_window: float | None = None,
        http_client: httpx.Client | None = None,
        wire: Literal["bundle", "json"] = "bundle",
    ):
        """`base_url`, `api_key` and `retry_window` default to $LMAAS_SERVER, $LMAAS_API_KEY and
        $LMAAS_RETRY_WINDOW_S (then to the local server, no key, 120 s). Retries stop when the window is over
        or after `max_retries` retries (None: the window alone bounds them)."""
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if retry_window is None:
            retry_window = float(os.environ.get(RETRY_WINDOW_ENV, DEFAULT_RETRY_WINDOW))
        if retry_window < 0:
            raise ValueError(f"retry_window must be >= 0 seconds, got {retry_window}")
        self.base_url = (base_url or os.environ.get(SERVER_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.max_retries = max_retries
        self.retry_window = retry_window
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A caller's own httpx.Client (proxies, TLS, transports) still gets our URL, key and timeout.
        self._http = http_client or httpx.Client()
        self._timeout = timeout
        self.wire = wire  # evaluate bodies as binary bundles (raw tensor buffers) or as JSON (base64)
        self._model_info: ModelInfo | None = None

    # ------------------------------------------------------------------------------------------- API

    def health(self) -> HealthResponse:
        return self._request("GET", "/health", HealthResponse)

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model's description (cached: it does not change while a server runs)."""
        if self._model_info is None or refresh:
            self._model_info = self._request("GET", "/model", ModelInfo)
        return self._model_info

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool = False, return_tokens: bool = False
    ) -> TokenizeResponse:
        texts = list(texts)
        size = self.model_info().limits.max_examples  # the server's limit of texts per request
        ids: list[list[int]] = []
        tokens: list[list[str]] | None = [] if return_tokens else None
        for start in range(0, max(len(texts), 1), size):
            body = TokenizeRequest(texts=texts[start : start + size], add_special_tokens=add_special_tokens,
                                   return_tokens=return_tokens)  # fmt: skip
            part = self._request("POST", "/tokenize", TokenizeResponse, body)
            ids += part.ids
            if tokens is not None:
                tokens += part.tokens or []
        return TokenizeResponse(ids=ids, tokens=tokens)

    def evaluate(self, request: EvaluateRequest, *, idempotency_key: str | None = None) -> EvaluateResponse:
        """Score the request's candidates; one idempotency key covers all retries of this evaluation."""
        key = idempotency_key or uuid.uuid4().hex
        return self._request(
            "POST", "/evaluate", EvaluateResponse, request, idempotency_key=key, bundle=self.wire == "bundle"
        )

    def register_inputs(self, spec: InputsSpec) -> InputsResponse:
        """Register an example set once; evaluate requests then send `inputs=<handle>` instead of texts."""
        return self._request("POST", "/inputs", InputsResponse, spec)

    def delete_inputs(self, handle: str) -> None:
        self._request("DELETE", f"/inputs/{handle}", None)

    def layer_std(self, handle: str) -> LayerStdResponse:
        """Per-layer hidden-state std on registered inputs (charged as one call, once across retries)."""
        body = LayerStdRequest(inputs=handle)
        return self._request("POST", "/layer_std", LayerStdResponse, body, idempotency_key=uuid.uuid4().hex)

    def usage(self) -> UsageResponse:
        """This key's budget, what it used and its newest requests (404 on a server without keys)."""
        return self._request("GET", "/usage", UsageResponse)

    # ------------------------------------------------------------------------------------------- deployed prompts

    def deploy(self, spec: PromptSpec) -> PromptInfo:
        """Store a tuned prompt on the server for this key; its id classifies texts (free). Deploying the same
        prompt again returns the same id, so retries store no copy."""
        return self._request("POST", "/prompts", PromptInfo, spec, bundle=self.wire == "bundle")

    def prompts(self) -> list[PromptInfo]:
        """This key's deployed prompts, newest first."""
        return self._request("GET", "/prompts", PromptList).prompts

    def prompt(self, prompt_id: str) -> PromptInfo:
        return self._request("GET", f"/prompts/{_path(prompt_id)}", PromptInfo)

    def delete_prompt(self, prompt_id: str) -> None:
        self._request("DELETE", f"/prompts/{_path(prompt_id)}", None)

    def classify(
        self, prompt_id: str, texts: Sequence[ClassifyText | str], *, idempotency_key: str | None = None
    ) -> ClassifyResponse:
        """Label and class probabilities per text with a deployed prompt (one call per text; at most the
        server's `limits.max_classify_texts` texts). One idempotency key covers all retries."""
        body = ClassifyRequest(prompt=prompt_id, texts=[ClassifyText(text_a=t) if isinstance(t, str) else t
                                                        for t in texts])  # fmt: skip
        key = idempotency_key or uuid.uuid4().hex
        return self._request("POST", "/classify", ClassifyResponse, body, idempotency_key=key)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LMaaSClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- transport

    def _request(
        self,
        method: str,
        path: str,
        response_model: type[ResponseT] | None,
        body: BaseModel | None = None,
        idempotency_key: str | None = None,
        bundle: bool = False,
    ) -> ResponseT:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = BUNDLE_MEDIA_TYPE if bundle else "application/json"
        if idempotency_key:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        content = None
        if body is not None:
            content = encode_bundle(body) if bundle else body.model_dump_json(exclude_none=True).encode()
        url = f"{self.base_url}{API_PREFIX}{path}"
        deadline = time.monotonic() + self.retry_window
        attempt = 0
        while True:
            try:
                response = self._http.request(method, url, content=content, headers=headers, timeout=self._timeout)
            except httpx.TimeoutException as exc:
                error: errors.LMaaSError = errors.APITimeoutError(f"{method} {url} timed out: {exc}")
                retry_after = None
            except httpx.TransportError as exc:
                error, retry_after = errors.APIConnectionError(f"cannot reach {self.base_url}: {exc}"), None
            else:
                if response.is_success:
                    return None if response_model is None else _parse(response, response_model)
                error = _status_error(response)
                if response.status_code not in RETRYABLE_STATUS:
                    raise error
                retry_after = error.retry_after
            delay = self._delay(attempt, retry_after)
            if (self.max_retries is not None and attempt >= self.max_retries) or time.monotonic() + delay > deadline:
                raise error
            log.warning("retrying in %.1fs after %s", delay, error)
            time.sleep(delay)
            attempt += 1

    @staticmethod
    def _delay(attempt: int, retry_after: float | None) -> float:
        """Retry-After when the server gave one, else exponential backoff with jitter."""
        if retry_after is not None:  # the server knows best; one beyond the retry window ends the retries
            return max(retry_after, 0.0)
        return min(INITIAL_RETRY_DELAY * 2**attempt, MAX_RETRY_DELAY) * (1 - RETRY_JITTER * random.random())


def _path(segment: str) -> str:
    """One URL path segment: an id with '/' or '..' in it stays one segment (and gets its 404)."""
    return urllib.parse.quote(segment, safe="")


def _parse(response: httpx.Response, model: type[ResponseT]) -> ResponseT:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise errors.ServerError(
            f"unexpected response body for {model.__name__}: {exc.errors()[0].get('msg')}", status=response.status_code
        ) from exc


def _status_error(response: httpx.Response) -> errors.APIStatusError:
    retry_after = _retry_after(response.headers.get("Retry-After"))
    cls = errors.error_class(response.status_code)
    try:
        detail = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        text = response.text[:500] or response.reason_phrase
        return cls(text, status=response.status_code, retry_after=retry_after)
    return cls(
        detail.message,
        status=response.status_code,
        code=detail.code.value,
        param=detail.param,
        request_id=detail.request_id,
        details=detail.details,
        retry_after=retry_after,
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110); None if absent or bad."""
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # an HTTP date is GMT by definition
        moment = moment.replace(tzinfo=UTC)
    return max((moment - datetime.now(UTC)).total_seconds(), 0.0)
