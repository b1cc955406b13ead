"""Dynamic batching: one worker thread runs every forward pass, packing rows of concurrent requests.

Request threads submit jobs and wait. Each round the worker takes every pending job, builds their rows
(computing any missing prefix caches first: that is forward work too), and runs them in token-bounded
batches, so several clients tuning at once share forward passes instead of queueing behind a lock.

An accelerator that runs out of memory on a batch gets its two halves instead, down to single rows: the
requests that fit still complete, and only a request whose rows fail alone gets 503 (`Overloaded`, refunded).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from lmaas_runtime import Row, batches
from lmaas_runtime.memory import is_out_of_memory, release_cached_memory
from lmaas_server import metrics
from lmaas_server.engine.backends import Backend
from lmaas_server.errors import Overloaded

log = logging.getLogger(__name__)
T = TypeVar("T")


class Job:
    def __init__(self, build: Callable[[], list[Row]]):
        self.build = build  # runs on the worker thread
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False  # set by a request that stopped waiting (timeout): its rows are skipped


class Scheduler:
    def __init__(self, forward: Backend, max_batch_tokens: int, context_weight: float = 0.5):
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.context_weight = context_weight  # a cached prefix position's cost in computed tokens
        self.batch_sizes: list[int] = []  # rows per forward of the last round (for tests and metrics)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="lmaas-forward", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def run(self, job: Job, timeout: float | None = None) -> bool:
        """Submit `job` and wait until its rows are scored; re-raises the worker's error.

        Returns False when `timeout` passed first: the job is cancelled (rows not yet run are skipped).
        """
        self._queue.put(job)
        if not job.done.wait(timeout):
            job.cancelled = True
            return False
        if job.error is not None:
            raise job.error
        return True

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread (for forward work that is not scoring rows) and return its result."""
        box: list[T] = []
        self.run(Job(lambda: box.append(fn()) or []))
        return box[0]

    @staticmethod
    def _failure(error: BaseException, what: str) -> BaseException:
        """What the waiting request raises: out-of-memory becomes a retryable 503, anything else as it is."""
        if is_out_of_memory(error):
            release_cached_memory()
            log.warning("out of memory on %s: %s", what, error)
            return Overloaded()
        return error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while True:  # everything pending right now joins this round
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._round(jobs)
                    return
                jobs.append(job)
            self._round(jobs)

    def _round(self, jobs: list[Job]) -> None:
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        rows: list[Row] = []
        owner: dict[int, Job] = {}
        for job in jobs:
            if job.cancelled:
                continue
            try:
                built = job.build()
            except BaseException as exc:
                job.error = self._failure(exc, "building a request's rows")
                continue
            rows += built
            owner.update((id(row), job) for row in built)
        sizes: list[int] = []
        for batch in batches(rows, self.max_batch_tokens, self.context_weight):
            self._run(batch, owner, sizes)
        self.batch_sizes = sizes
        for job in jobs:
            job.done.set()

    def _run(self, batch: list[Row], owner: dict[int, Job], sizes: list[int]) -> None:
        """One forward pass over the rows of live requests; out of memory: each half again, down to one row."""
        batch = [row for row in batch if not owner[id(row)].cancelled and owner[id(row)].error is None]
        if not batch:
            return
        try:
            self.forward.run(batch)
        except BaseException as exc:
            if is_out_of_memory(exc) and len(batch) > 1:
                release_cached_memory()
                log.warning("out of memory on a batch of %d rows; running it in halves", len(batch))
                metrics.OOM_SPLITS.inc()
                half = len(batch) // 2
                self._run(batch[:half], owner, sizes)
                self._run(batch[half:], owner, sizes)
                return
            if not is_out_of_memory(exc):
                log.exception("forward pass failed")
            failure = self._failure(exc, "a single row")
            for row in batch:
                owner[id(row)].error = failure
            return
        sizes.append(len(batch))
        metrics.BATCH_ROWS.observe(len(batch))
