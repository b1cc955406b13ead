"""Per-request deadlines and a prompt stop on SIGTERM.

A `Deadline` starts when the engine takes a charged request and covers all its work: projection matrices
are generated here chunk by chunk (checking the deadline between chunks) and the forward passes wait at
most what is left. When it passes the request ends with 504; when the server is stopping (`stop()`, called
from the SIGTERM handler) every in-flight request ends with 503 at its next check, and jobs waiting on the
forward worker are cancelled and woken, so the process exits in seconds instead of finishing the work.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import uvicorn

from lmaas_protocol import ErrorCode, ProjectionSpec, projection
from lmaas_server.errors import APIError

STOPPING = threading.Event()  # set once, by the SIGTERM handler (cli.serve)
_waiting: set = set()  # scheduler jobs of in-flight requests (woken on stop)
_waiting_lock = threading.Lock()
_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("lmaas_deadline", default=None)


class ShuttingDown(APIError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.SHUTTING_DOWN, "the server is shutting down; retry (nothing was charged)",
                         headers={"Retry-After": "5"})  # fmt: skip


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def check(self) -> None:
        """503 when the server is stopping, 504 when the time is up; else nothing."""
        if STOPPING.is_set():
            raise ShuttingDown()
        if time.monotonic() >= self.end:
            raise timed_out(self.seconds)

    def after_wait(self, finished: bool) -> None:
        """After waiting for the forward worker: 503 when the server is stopping (the job was cut short), 504
        when the wait ran out first."""
        if STOPPING.is_set():
            raise ShuttingDown()
        if not finished:
            raise timed_out(self.seconds)

    @contextmanager
    def active(self) -> Iterator[Deadline]:
        """Make this the deadline of the work done in this block (in this thread) by `materialize`."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    @contextmanager
    def watching(self, job) -> Iterator[None]:
        """While `job` waits for the forward worker, a stop cancels it and wakes its waiter."""
        with _waiting_lock:
            _waiting.add(job)
        try:
            yield
        finally:
            with _waiting_lock:
                _waiting.discard(job)


def timed_out(seconds: float) -> APIError:
    return APIError(ErrorCode.TIMEOUT, f"the request took longer than {seconds:g} s; nothing was charged")


def stop() -> None:
    """Called on SIGTERM: in-flight requests end with 503 at their next check; waiting jobs are cancelled."""
    STOPPING.set()
    with _waiting_lock:
        jobs = list(_waiting)
    for job in jobs:
        job.cancelled = True  # the worker skips rows it has not run yet
        job.done.set()


class StoppingServer(uvicorn.Server):
    """uvicorn's server that, on SIGTERM or SIGINT, first ends in-flight requests with 503 (`stop`), then
    shuts down as usual."""

    def handle_exit(self, sig, frame) -> None:
        stop()
        super().handle_exit(sig, frame)


def materialize(spec: ProjectionSpec) -> np.ndarray:
    """`lmaas_protocol.materialize` (the same bits), checking the current request's deadline between chunks.
    A [dim, prod(shape)] float32."""
    deadline = _current.get()
    return projection.materialize(spec, None if deadline is None else deadline.check)
