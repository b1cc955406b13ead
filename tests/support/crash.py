"""Stopping a tuning run part-way, as a crash would, to test that `--resume` ends like an uninterrupted run."""

from __future__ import annotations

from collections.abc import Callable


class Crash(Exception):
    """Raised from a progress hook: the run stops mid-way with its last checkpoint on disk."""


def crash_after(calls: int) -> Callable:
    """A runner `on_progress` hook that raises Crash at the first generation report with >= `calls` used."""

    def hook(progress) -> None:
        if progress.message is None and progress.calls_used >= calls:
            raise Crash

    return hook
