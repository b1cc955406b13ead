"""`LMaaSClient` over real HTTP: the live server on a tiny model, and a scripted front that fails the first
requests (503/429/dropped connections/stalls) before handing over to the real app, recording what it saw."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

import lmaas_client.client as client_module
from lmaas_client import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BudgetExhaustedError,
    LMaaSClient,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
)
from lmaas_protocol import (
    IDEMPOTENCY_HEADER,
    Candidate,
    ErrorCode,
    ErrorDetail,
    ErrorResponse,
    EvaluateRequest,
    Example,
    Tensor,
)
from tests.conftest import LiveServer, free_port
from tests.support.tiny_models import build_tokenizer

CAUSAL_TEMPLATE = "{prompt}Review: {text_a}\nSentiment:{mask}"
KEY_HEADER = IDEMPOTENCY_HEADER.lower()


# ----------------------------------------------------------------------------------------- scripted front


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


def status(
    code: int, *, headers: dict[str, str] | None = None, body: bytes | None = None, error: ErrorDetail | None = None
):
    """A fault: answer with `code` (an ErrorResponse body unless `body` is given)."""
    if body is None:
        detail = error or ErrorDetail(code=ErrorCode.INTERNAL_ERROR, message=f"scripted {code}")
        body = ErrorResponse(error=detail).model_dump_json().encode()
        content_type = b"application/json"
    else:
        content_type = b"text/plain"

    async def respond(send) -> None:
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        length = str(len(body)).encode()
        headers_out = [(b"content-type", content_type), (b"content-length", length), *extra]
        await send({"type": "http.response.start", "status": code, "headers": headers_out})
        await send({"type": "http.response.body", "body": body})

    return respond


def drop():
    """A fault: promise 100 bytes, send 5, and hang up (the client sees a broken connection)."""

    async def respond(send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b'{"ok"', "more_body": True})
        # returning without finishing the body makes uvicorn close the connection

    return respond


def stall(seconds: float):
    """A fault: answer nothing for `seconds` (longer than the client's timeout)."""

    async def respond(send) -> None:
        await asyncio.sleep(seconds)
        await status(503)(send)

    return respond


class ScriptedFront:
    """ASGI app in front of the real lmaas app: records every HTTP request, plays `faults` in order (on any
    path), then delegates to the real app; `always` replaces the real app once the faults are used up."""

    def __init__(self, inner, faults=(), always=None):
        self.inner = inner
        self.faults = list(faults)
        self.always = always
        self.seen: list[Seen] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.inner(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append(Seen(scope["method"], scope["path"], headers, time.monotonic()))
        fault = self.faults.pop(0) if self.faults else self.always
        if fault is None:
            await self.inner(scope, receive, send)
            return
        message = await receive()
        while message.get("more_body"):
            message = await receive()
        await fault(send)

    def arm(self, *faults) -> None:
        self.faults.extend(faults)

    def keys(self, path: str = "/v1/evaluate") -> list[str | None]:
        return [s.headers.get(KEY_HEADER) for s in self.seen if s.path == path]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.001)
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 0.01)


@pytest.fixture
def front(engines):
    """Factory: `front_app, url = front(status(503), drop(), always=None, budget=None)` in front of llama."""
    from lmaas_server.main import create_app

    servers: list[LiveServer] = []

    def start(*faults, always=None, **settings):
        engine = engines("llama", **settings)
        app = ScriptedFront(create_app(engine.settings, engine=engine), faults, always)
        server = LiveServer(app).__enter__()
        servers.append(server)
        return app, server.url

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def verbalizer(client: LMaaSClient) -> list[list[int]]:
    return [[ids[0]] for ids in client.tokenize([" negative", " positive"]).ids]


def evaluate_request(client: LMaaSClient, candidates=None, **overrides) -> EvaluateRequest:
    fields = dict(
        template=CAUSAL_TEMPLATE,
        examples=[
            Example(text_a="fun to watch", label=1),
            Example(text_a="a bad film , boring", label=0),
            Example(text_a="the plot is thin", label=0),
        ],
        verbalizer=verbalizer(client),
        candidates=candidates or [Candidate()],
    )
    fields.update(overrides)
    return EvaluateRequest(**fields)


def bare_request() -> EvaluateRequest:
    """A valid request that needs no round trip to build (for servers that only ever fail)."""
    return EvaluateRequest(template=CAUSAL_TEMPLATE, examples=[Example(text_a="a")], verbalizer=[[1], [2]],
                           candidates=[Candidate()])  # fmt: skip


# ----------------------------------------------------------------------------------------- the live server


def test_health_model_info_tokenize_and_evaluate(live_server):
    with live_server("llama") as server, LMaaSClient(server.url) as client:
        health = client.health()
        assert health.status == "ok" and health.model_loaded and health.model

        info = client.model_info()
        assert info.family == "causal" and info.hidden_size == 32 and info.vocab_size == len(build_tokenizer("llama"))
        assert info.embedding_std > 0 and info.limits.max_candidates >= 1
        assert client.model_info() is info  # cached
        assert client.model_info(refresh=True) == info

        tokens = client.tokenize([" bad", " great", "the movie"], return_tokens=True)
        assert len(tokens.ids) == 3 and tokens.ids[0] != tokens.ids[1]
        assert tokens.tokens is not None and tokens.tokens[0] == ["Ġbad"]
        assert client.tokenize(["x"]).tokens is None

        soft = np.random.default_rng(0).normal(0, 1, (2, info.hidden_size)).astype(np.float32)
        request = evaluate_request(client, [Candidate(), Candidate(soft_prompt=Tensor.from_numpy(soft))])
        response = client.evaluate(request)
        assert len(response.results) == 2
        for result in response.results:
            logits = result.logits.to_numpy()
            assert logits.shape == (3, 2) and np.isfinite(logits).all()
            assert result.loss is not None and result.loss > 0
            assert 0.0 <= result.accuracy <= 1.0
        assert np.abs(response.results[0].logits.to_numpy() - response.results[1].logits.to_numpy()).max() > 1e-4
        assert response.usage.calls == 2 and response.usage.examples == 3
        assert response.usage.budget_remaining is None  # unlimited server


def test_bad_request_is_typed_with_its_param_and_not_retried(front):
    app, url = front()
    with LMaaSClient(url, max_retries=3) as client:
        request = evaluate_request(client, verbalizer=[[1], [10**6]])
        with pytest.raises(BadRequestError) as caught:
            client.evaluate(request)
    error = caught.value
    assert error.status == 422 and error.code == "invalid_request"
    assert error.param == "verbalizer.1.0"
    assert "vocabulary" in error.message and "param: verbalizer.1.0" in str(error)
    assert error.request_id  # the server's id comes back
    assert len(app.keys()) == 1


def test_budget_exhausted_is_typed_with_remaining_and_not_retried(front):
    app, url = front(budget=3)
    with LMaaSClient(url, max_retries=3) as client:
        first = client.evaluate(evaluate_request(client, [Candidate(), Candidate()]))
        assert first.usage.budget_remaining == 1
        with pytest.raises(BudgetExhaustedError) as caught:
            client.evaluate(evaluate_request(client, [Candidate(), Candidate()]))
    error = caught.value
    assert error.status == 402 and error.code == "budget_exhausted"
    assert error.remaining == 1 and error.details["requested"] == 2
    assert len(app.keys()) == 2  # one request each: the 402 was not retried


def test_scripted_402_is_not_retried(front):
    detail = ErrorDetail(code=ErrorCode.BUDGET_EXHAUSTED, message="spent", details={"requested": 1, "remaining": 0})
    app, url = front(always=status(402, error=detail))
    with LMaaSClient(url, max_retries=4) as client, pytest.raises(BudgetExhaustedError) as caught:
        client.evaluate(bare_request())
    assert caught.value.remaining == 0
    assert len(app.seen) == 1


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (410, NotFoundError),
        (413, PayloadTooLargeError),
        (422, BadRequestError),
    ],
)
def test_4xx_other_than_408_409_429_are_never_retried(front, code, error_class):
    app, url = front(always=status(code))
    with LMaaSClient(url, max_retries=3) as client, pytest.raises(error_class) as caught:
        client.health()
    assert type(caught.value) is error_class
    assert caught.value.status == code and caught.value.message == f"scripted {code}"
    assert len(app.seen) == 1


def test_server_error_after_retries_are_exhausted(front):
    app, url = front(always=status(503))
    with LMaaSClient(url, max_retries=2) as client, pytest.raises(ServerError) as caught:
        client.evaluate(bare_request())
    assert caught.value.status == 503 and caught.value.code == "internal_error"
    keys = app.keys()
    assert len(keys) == 2 + 1  # max_retries + 1 attempts
    assert keys[0] and len(set(keys)) == 1  # one Idempotency-Key for all attempts


def test_non_json_error_body_still_gives_a_typed_error(front):
    app, url = front(always=status(502, body=b"upstream is down"))
    with LMaaSClient(url, max_retries=1) as client, pytest.raises(ServerError) as caught:
        client.health()
    assert caught.value.status == 502 and "upstream is down" in str(caught.value)
    assert len(app.seen) == 2


def test_retries_reuse_one_idempotency_key_and_calls_use_new_ones(front):
    app, url = front()
    with LMaaSClient(url, max_retries=4) as client:
        request = evaluate_request(client)
        app.arm(status(503), status(500), drop(), status(429, headers={"Retry-After": "0"}))
        first = client.evaluate(request)
        assert len(app.keys()) == 5  # 4 failures + the real answer
        second = client.evaluate(request)
        third = client.evaluate(request, idempotency_key="my-own-key")
    keys = app.keys()
    assert len(keys) == 7
    assert len(set(keys[:5])) == 1 and keys[0]
    assert keys[5] not in keys[:5] and keys[5]
    assert keys[6] == "my-own-key"
    assert all(s.headers.get(KEY_HEADER) is None for s in app.seen if s.path != "/v1/evaluate")
    np.testing.assert_array_equal(first.results[0].logits.to_numpy(), second.results[0].logits.to_numpy())
    assert third.usage.calls == 1


def test_dropped_connections_are_retried_then_raise_connection_error(front):
    app, url = front(always=drop())
    with LMaaSClient(url, max_retries=2) as client, pytest.raises(APIConnectionError) as caught:
        client.health()
    assert not isinstance(caught.value, APITimeoutError)
    assert url in str(caught.value)
    assert len(app.seen) == 3


def test_rate_limit_honours_retry_after(front, monkeypatch):
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 5.0)
    # Retry-After: 0 beats a long backoff ...
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 5.0)
    app, url = front(status(429, headers={"Retry-After": "0"}), status(429, headers={"Retry-After": "0"}))
    with LMaaSClient(url, max_retries=2) as client:
        start = time.monotonic()
        assert client.health().status == "ok"
        assert time.monotonic() - start < 2.0
    assert len(app.seen) == 3
    # ... and a longer Retry-After beats a short backoff
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.001)
    app, url = front(status(429, headers={"Retry-After": "0.4"}))
    with LMaaSClient(url, max_retries=2) as client:
        assert client.health().status == "ok"
    assert len(app.seen) == 2 and app.seen[1].at - app.seen[0].at >= 0.35


def test_rate_limited_error_after_retries(front):
    detail = ErrorDetail(code=ErrorCode.RATE_LIMITED, message="slow down")
    app, url = front(always=status(429, headers={"Retry-After": "0"}, error=detail))
    with LMaaSClient(url, max_retries=1) as client, pytest.raises(RateLimitedError) as caught:
        client.health()
    assert caught.value.status == 429 and caught.value.retry_after == 0.0 and caught.value.code == "rate_limited"
    assert len(app.seen) == 2


def test_backoff_doubles_and_is_capped(front, monkeypatch):
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.05)
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 10.0)
    app, url = front(always=status(503))
    with LMaaSClient(url, max_retries=3) as client, pytest.raises(ServerError):
        client.health()
    gaps = np.diff([s.at for s in app.seen])
    assert len(gaps) == 3
    for i, gap in enumerate(gaps):  # 0.05 * 2**i, up to 25 % shorter (jitter)
        assert gap >= 0.75 * 0.05 * 2**i - 0.005
    assert gaps[2] > 2 * gaps[0]

    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.4)
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 0.02)  # uncapped, this would sleep 0.4+0.8+1.6 s
    app, url = front(always=status(503))
    with LMaaSClient(url, max_retries=3) as client, pytest.raises(ServerError):
        client.health()
    assert app.seen[-1].at - app.seen[0].at < 0.8


def test_closed_port_raises_connection_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with LMaaSClient(url, max_retries=0) as client, pytest.raises(APIConnectionError) as caught:
        client.model_info()
    assert url in str(caught.value)
    start = time.monotonic()
    with LMaaSClient(url, max_retries=2) as client, pytest.raises(APIConnectionError):
        client.health()
    assert time.monotonic() - start < 5


def test_timeout_is_retried_then_raises_timeout_error(front):
    app, url = front(stall(1.0), stall(1.0))
    with LMaaSClient(url, max_retries=1, timeout=0.2) as client:
        start = time.monotonic()
        with pytest.raises(APITimeoutError) as caught:
            client.health()
        assert time.monotonic() - start < 0.9
    assert isinstance(caught.value, APIConnectionError)  # a timeout is a kind of connection error
    assert len(app.seen) == 2


def test_api_key_is_sent_as_bearer_token(front):
    app, url = front()
    with LMaaSClient(url, api_key="sk-test") as client:
        client.health()
    with LMaaSClient(url) as client:
        client.health()
    assert app.seen[0].headers.get("authorization") == "Bearer sk-test"
    assert "authorization" not in app.seen[1].headers


def test_custom_http_client_still_uses_base_url_and_api_key(front):
    app, url = front()
    with LMaaSClient(url, api_key="sk-test", http_client=httpx.Client(timeout=5), max_retries=0) as client:
        assert client.health().status == "ok"
    assert app.seen[0].headers.get("authorization") == "Bearer sk-test"


def test_malformed_success_body_is_a_server_error(front):
    _app, url = front(always=status(200, body=json.dumps({"status": "fine"}).encode()))
    with LMaaSClient(url, max_retries=2) as client, pytest.raises(ServerError) as caught:
        client.health()
    assert "HealthResponse" in str(caught.value)


def test_client_package_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, lmaas_client, lmaas_client.cli, lmaas_client.run, lmaas_client.tuners, "
            "lmaas_client.evaluation; heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_409_in_flight_is_retried_with_the_same_key_after_retry_after(front):
    """A retry that finds its first attempt still running gets 409 + Retry-After: wait, ask again, same key."""
    conflict = ErrorDetail(code=ErrorCode.CONFLICT, message="still in flight")
    app, url = front()
    with LMaaSClient(url) as client:
        request = evaluate_request(client)
        app.arm(status(409, headers={"Retry-After": "0"}, error=conflict), status(409, error=conflict))
        response = client.evaluate(request)
    keys = app.keys()
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]
    assert response.usage.calls == 1


def test_retry_after_as_an_http_date(front, monkeypatch):
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 5.0)  # the date, not the backoff, sets the wait
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=1.2), usegmt=True)
    app, url = front(status(503, headers={"Retry-After": when}))
    with LMaaSClient(url) as client:
        assert client.health().status == "ok"
    gap = app.seen[1].at - app.seen[0].at
    assert 0.1 <= gap <= 2.5  # whole-second dates: between 0.2 and 1.2 s from now
    assert client_module._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: at once
    assert client_module._retry_after("soon") is None


def test_retries_ride_out_a_restart_within_the_window(front, monkeypatch):
    """Retries go on for the retry window (not a fixed count): a server that is away for ~1 s is waited for."""
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.05)
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 0.2)
    app, url = front(*[drop()] * 8)  # about 8 x 0.15 s of a server that hangs up
    with LMaaSClient(url, retry_window=10) as client:
        assert client.health().status == "ok"
    assert len(app.seen) == 9
    app, url = front(*[drop()] * 8)
    with LMaaSClient(url, retry_window=0.3) as client, pytest.raises(APIConnectionError):
        client.health()  # a short window gives up first
    assert 1 < len(app.seen) < 9


def test_client_reads_server_key_and_window_from_the_environment(front, monkeypatch):
    app, url = front()
    monkeypatch.setenv("LMAAS_SERVER", url)
    monkeypatch.setenv("LMAAS_API_KEY", "sk-env")
    monkeypatch.setenv("LMAAS_RETRY_WINDOW_S", "7.5")
    with LMaaSClient() as client:
        assert client.health().status == "ok" and client.retry_window == 7.5
    assert app.seen[0].headers.get("authorization") == "Bearer sk-env"
    with pytest.raises(ValueError, match="retry_window"):
        LMaaSClient(url, retry_window=-1)
