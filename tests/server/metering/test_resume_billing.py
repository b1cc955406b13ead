"""A tuning run killed with kill -9 while a request is in flight, then resumed: the key pays exactly the calls
the run reports (the run's idempotency keys replay what was in flight), and resuming a finished run is free."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

from tests.conftest import REPO
from tests.server.metering.conftest import BIN, Database

DATA = str(REPO / "data")


def tune(server_url: str, secret: str, out, *extra: str) -> subprocess.Popen:
    args = [str(BIN / "lmaas"), "tune", "--out", str(out), *extra]
    if "--resume" not in extra:
        args += ["--server", server_url, "--budget", "9", "--popsize", "3", "--prompt-length", "2",
                 "--intrinsic-dim", "8", "--test-size", "16", "--eval-every", "3", "--data-dir", DATA,
                 "--placement", "suffix", "--seed", "13"]  # fmt: skip
    env = {**os.environ, "LMAAS_API_KEY": secret, "LMAAS_NO_PROGRESS": "1", "LMAAS_RETRY_WINDOW_S": "5"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_run_killed_mid_request_and_resumed_pays_exactly_what_it_reports(database: Database, metered_server,
                                                                            monkeypatch, tmp_path):  # fmt: skip
    with metered_server(database) as server:
        secret, described = server.meter.create_key(1000)
        real, seen, in_flight = server.engine.score, [], threading.Event()

        def slow_fourth(*args, **kwargs):
            seen.append(1)
            # a request of the first generation (after the manual prompt's test, its calibration on train, its dev
            # score for the manual floor, and two train calls): the client dies while it runs
            if len(seen) == 6:
                in_flight.set()
                time.sleep(2)
            return real(*args, **kwargs)

        monkeypatch.setattr(server.engine, "score", slow_fourth)
        out = tmp_path / "run"
        first = tune(server.url, secret, out)
        assert in_flight.wait(120), first.communicate()[0]
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        time.sleep(2.5)  # the server finishes (and charges) the orphaned request
        assert not (out / "result.json").exists()
        resumed = tune(server.url, secret, out, "--resume")
        output = resumed.communicate(timeout=300)[0].decode()
        assert resumed.returncode == 0, output
        result = json.loads((out / "result.json").read_text())
        used = database.assert_consistent(described.prefix).used
        assert used == result["calls_used"] + result["eval_calls"], (used, result["calls_used"], result["eval_calls"])

        again = tune(server.url, secret, out, "--resume")  # a completed run resumed: nothing happens
        assert again.wait(120) == 0
        assert database.assert_consistent(described.prefix).used == used
