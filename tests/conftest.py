"""Shared fixtures: tiny models saved once per session, engines on them, and live HTTP servers."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tiny_models import KINDS, save_tiny_model

# Servers started by the tests, in-process or as subprocesses, serve float32 unless a test asks otherwise: their
# references are float32, and `auto` would pick bfloat16 on CPUs with bfloat16 instructions (tested explicitly).
os.environ.setdefault("LMAAS_DTYPE", "float32")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {kind: save_tiny_model(kind, root / kind) for kind in KINDS}
    # the same tiny llama with a 2,048-token context: in-context demonstrations of 14-class tasks need room
    dirs["llama-long"] = save_tiny_model("llama", root / "llama-long", llama_positions=2048)
    return dirs


@pytest.fixture(scope="module")
def frozen(tiny_model_dirs):
    """`frozen(kind)`: the tiny model of that kind loaded as a `FrozenLM` (once per module), max length 128."""
    from lmaas_runtime import FrozenLM  # the runtime imports torch lazily; tests that use it need it anyway

    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = FrozenLM.load(str(tiny_model_dirs[kind]), max_length=128)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def engines(tiny_model_dirs):
    """Lazily built engine per tiny-model kind (masked: bert, roberta; causal: llama, gpt2)."""
    from lmaas_server.config import Settings
    from lmaas_server.engine import Engine
    from lmaas_server.model_loading import load_model

    cache: dict[str, Engine] = {}

    def get(kind: str, **overrides) -> Engine:
        overrides = {"require_api_key": False, **overrides}  # metering tests turn keys on explicitly
        key = f"{kind}{sorted(overrides.items())}"
        if key not in cache:
            settings = Settings(model=str(tiny_model_dirs[kind]), device="cpu", **overrides)
            cache[key] = Engine(load_model(settings), settings)
        return cache[key]

    return get


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(engines) -> Iterator:
    """Factory: `with live_server("llama", budget=10) as server:` serves a tiny model over real HTTP."""
    from lmaas_server.main import create_app

    def start(kind: str = "llama", **settings_overrides) -> LiveServer:
        engine = engines(kind, **settings_overrides)
        return LiveServer(create_app(engine.settings, engine=engine))

    return start
