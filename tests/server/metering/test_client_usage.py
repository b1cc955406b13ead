"""The client's view of metering: `LMaaSClient.usage()` and `lmaas usage` against a server with API keys."""

from __future__ import annotations

import json

from lmaas_client import LMaaSClient, NotFoundError
from lmaas_protocol import EvaluateRequest
from tests.client.test_runner_cli import cli
from tests.server.metering.conftest import Database, one_candidate_body


def test_usage_reports_the_keys_budget_and_newest_requests(database: Database, metered_server):
    with metered_server(database) as server:
        secret, _ = server.meter.create_key(10, name="notebook")
        with LMaaSClient(server.url, api_key=secret) as client:
            client.evaluate(EvaluateRequest(**one_candidate_body()))
            report = client.usage()
        printed = cli("usage", "--server", server.url, "--api-key", secret)
        as_json = cli("usage", "--server", server.url, "--api-key", secret, "--json")
    assert (report.used, report.remaining, report.name) == (1, 9, "notebook")
    assert report.recent[0].endpoint.endswith("evaluate") and report.recent[0].calls == 1
    assert printed.exit_code == 0 and "1/10 calls used, 9 left" in " ".join(printed.output.split())
    assert json.loads(as_json.stdout)["used"] == 1


def test_usage_on_a_server_without_keys_is_a_clear_not_found(live_server):
    with live_server() as server, LMaaSClient(server.url) as client:
        try:
            client.usage()
        except NotFoundError as exc:
            assert "without API keys" in str(exc)
        else:
            raise AssertionError("usage() on a server without keys must raise NotFoundError")
