"""What every `lmaas` command shares: the server and key options, the console, errors as exit codes."""

from __future__ import annotations

import os
import pickle
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmaas_client.errors import BudgetExhaustedError, LMaaSError
from lmaas_client.local_model import LocalModelError
from lmaas_client.tasks import TaskError

console = Console(stderr=True)

Server = Annotated[str, typer.Option(envvar="LMAAS_SERVER", help="Server base URL.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="LMAAS_API_KEY", help="API key (Bearer).", show_default=False)]

EXIT_ERROR, EXIT_BUDGET = 1, 3


class _errors:
    """Turn the client's errors into one readable line and an exit code, instead of a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, BudgetExhaustedError):
            console.print(f"[red]budget exhausted:[/] {exc}")
            raise typer.Exit(EXIT_BUDGET)
        if isinstance(
            exc, (LMaaSError, TaskError, ValidationError, ValueError, OSError, pickle.UnpicklingError, LocalModelError)
        ):
            console.print(f"[red]error:[/] {_describe(exc)}")
            raise typer.Exit(EXIT_ERROR)
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)


class _rows_bar:
    """A rich progress bar over rows classified."""

    def __init__(self, total: int):
        self.progress = Progress(TextColumn("[bold]classifying"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console,
                                 disable=os.environ.get("LMAAS_NO_PROGRESS") == "1")  # fmt: skip
        self.task_id = self.progress.add_task("predict", total=total)

    def __enter__(self):
        self.progress.start()
        return lambda done: self.progress.update(self.task_id, completed=done)

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()
