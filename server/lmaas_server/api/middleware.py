"""Pure ASGI middleware, the HTTP layer beside the routes: a request id on every request and response, a hard
cap on body size, and 500s that keep the connection open."""

from __future__ import annotations

import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmaas_protocol import REQUEST_ID_HEADER, ErrorCode, ErrorDetail, ErrorResponse
from lmaas_server.api.asgi import HTTPMiddleware
from lmaas_server.logs import REQUEST_ID

log = logging.getLogger(__name__)
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestContextMiddleware(HTTPMiddleware):
    """Assigns `scope["state"]["request_id"]` (the client's X-Request-ID if sane) and echoes it back."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = _header(scope, REQUEST_ID_HEADER.lower())
        request_id = given if given and _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)  # every log record of this request carries it

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                name = REQUEST_ID_HEADER.lower().encode()
                if not any(key.lower() == name for key, _ in headers):
                    headers.append((name, request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class BodyLimitMiddleware(HTTPMiddleware):
    """Rejects bodies over `max_bytes` with 413 before the app parses them (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        super().__init__(app)
        self.max_bytes = max_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _header(scope, "content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, send)
            return
        received = 0
        chunks: list[Message] = []
        while True:  # read the whole (bounded) body first, then replay it to the app
            message = await receive()
            chunks.append(message)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._reject(scope, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(chunks)

        async def replay_receive() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replay_receive, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        detail = ErrorDetail(
            code=ErrorCode.PAYLOAD_TOO_LARGE,
            message=f"request body exceeds {self.max_bytes} bytes",
            request_id=scope.get("state", {}).get("request_id"),
            details={"max_body_bytes": self.max_bytes},
        )
        await _send_json(send, 413, ErrorResponse(error=detail), None)


def _header(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key.decode("latin-1").lower() == name:
            return value.decode("latin-1")
    return None


class InternalErrorMiddleware(HTTPMiddleware):
    """Answers unexpected exceptions with the 500 ErrorResponse itself, inside the app.

    Starlette's outermost error middleware would also answer them, but then re-raises, and uvicorn drops
    the keep-alive connection; a pooled client's next request would fail on a reset socket.
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            request_id = scope.get("state", {}).get("request_id")
            detail = ErrorDetail(
                code=ErrorCode.INTERNAL_ERROR,
                message=f"internal error ({type(exc).__name__}); nothing was charged",
                request_id=request_id,
            )
            await _send_json(send, 500, ErrorResponse(error=detail), request_id)


async def _send_json(send: Send, status: int, body: ErrorResponse, request_id: str | None) -> None:
    payload = body.model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if request_id:
        headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
