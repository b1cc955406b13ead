"""`lmaas-server` command line: `serve` starts the HTTP server on one model."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

app = typer.Typer(help="lmaas server: a frozen LM behind a forward-only API.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """lmaas server commands."""


@app.command()
def serve(
    model: Annotated[
        Optional[str], typer.Option(help="HF id, local folder or .gguf file [default: SmolLM2-135M-Instruct, offline]")
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to bind [default: 127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port [default: 8000]")] = None,
    budget: Annotated[
        Optional[int], typer.Option(help="Total calls this server may charge [default: unlimited]")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    family: Annotated[Optional[str], typer.Option(help="auto, masked or causal")] = None,
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
) -> None:
    """Load the model and serve the /v1 API (options override LMAAS_* environment variables)."""
    import uvicorn

    from lmaas_server.config import Settings
    from lmaas_server.main import create_app

    overrides = {"model": model, "host": host, "port": port, "budget": budget, "device": device, "family": family}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)


if __name__ == "__main__":
    app()
