"""Logging: text (the default) or JSON lines (python-json-logger), every record carrying the request id.

The request id is set per request by `api.middleware.RequestContextMiddleware` in a context variable;
threadpool threads inherit it, so engine and metering logs of a request carry its id too.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import IO

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmaas_request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = ["asctime", "levelname", "name", "message", "request_id"]


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`: the id of the request being served in this context, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """One root handler in `fmt` ("text" or "json"); uvicorn's loggers propagate to it in JSON mode."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
