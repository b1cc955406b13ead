"""JSON logs carry the request id (python-json-logger); LMAAS_LOG_FORMAT is read by Settings only."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmaas_server.api.middleware import RequestContextMiddleware
from lmaas_server.config import Settings
from lmaas_server.logs import configure


@pytest.fixture
def restored_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_log_lines_carry_the_request_id(restored_root_logging):
    stream = io.StringIO()
    configure("info", "json", stream)
    app = FastAPI()

    @app.get("/work")
    def work() -> dict:  # a sync route: runs in the threadpool, which inherits the request's context
        logging.getLogger("lmaas_server.test").info("working on it")
        return {}

    app.add_middleware(RequestContextMiddleware)
    TestClient(app).get("/work", headers={"X-Request-ID": "req-42"})
    logging.getLogger("lmaas_server.test").info("outside a request")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    inside = next(line for line in lines if line["message"] == "working on it")
    assert inside["request_id"] == "req-42" and inside["level"] == "INFO" and inside["logger"] == "lmaas_server.test"
    outside = next(line for line in lines if line["message"] == "outside a request")
    assert outside["request_id"] is None


def test_text_logs_stay_text(restored_root_logging):
    stream = io.StringIO()
    configure("info", "text", stream)
    logging.getLogger("lmaas_server.test").info("plain")
    assert stream.getvalue().rstrip().endswith("INFO lmaas_server.test: plain")


def test_the_log_format_comes_from_settings(monkeypatch):
    monkeypatch.setenv("LMAAS_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("LMAAS_LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        Settings()


def test_serve_takes_a_log_format_flag():
    from typer.testing import CliRunner

    from lmaas_server.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0 and "--log-format" in result.output
