"""`lmaas-server`: `serve` the /v1 API on one model; `keys` manages API keys in the metering database."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Annotated, Optional

import typer

app = typer.Typer(help="lmaas server: a frozen LM behind a forward-only, metered API.", no_args_is_help=True)
keys = typer.Typer(
    help="API keys (works on the configured database, also while the server runs).", no_args_is_help=True
)
app.add_typer(keys, name="keys")

DatabaseUrl = Annotated[
    Optional[str],
    typer.Option(help="Metering database [default: LMAAS_DATABASE_URL or ~/.local/share/lmaas/lmaas.db]."),
]


@app.callback()
def main() -> None:
    """lmaas server commands."""


GRACEFUL_SHUTDOWN_S = 5  # a backstop: in-flight requests already end with 503 at the signal


@app.command()
def serve(
    model: Annotated[
        Optional[str], typer.Option(help="HF id, local folder or .gguf file [default: SmolLM2-135M-Instruct, offline]")
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to bind [default: 127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port [default: 8000]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    device_map: Annotated[
        Optional[str],
        typer.Option(help="Spread the model over several GPUs (then CPU, disk): auto, balanced, sequential or JSON"),
    ] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 or float16")] = None,
    family: Annotated[Optional[str], typer.Option(help="auto, masked or causal")] = None,
    backend: Annotated[
        Optional[str],
        typer.Option(help="transformers (the model in this process) or vllm (a vllm serve at --vllm-url)"),
    ] = None,
    vllm_url: Annotated[
        Optional[str], typer.Option(help="With --backend vllm: the vLLM server, http://host:port")
    ] = None,
    vllm_model: Annotated[
        Optional[str], typer.Option(help="With --backend vllm: its served model name [default: the only one]")
    ] = None,
    database_url: DatabaseUrl = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without API keys (development): one in-memory budget.")
    ] = False,
    budget: Annotated[Optional[int], typer.Option(help="With --no-auth: total calls this server may charge")] = None,
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
    log_format: Annotated[
        Optional[str],
        typer.Option(help="text or json (JSON lines with the request id) [default: LMAAS_LOG_FORMAT or text]"),
    ] = None,
) -> None:
    """Load the model and serve the /v1 API (options override LMAAS_* environment variables)."""
    settings = _settings(model=model, host=host, port=port, device=device, device_map=device_map, dtype=dtype,
                         family=family, backend=backend, vllm_url=vllm_url, vllm_model=vllm_model,
                         database_url=database_url, budget=budget,
                         require_api_key=False if no_auth else None, log_format=log_format)  # fmt: skip
    if settings.prometheus_multiproc_dir:  # must be set before prometheus_client is imported
        settings.prometheus_multiproc_dir.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.prometheus_multiproc_dir)
    import uvicorn

    from lmaas_server.engine.deadline import StoppingServer
    from lmaas_server.logs import configure
    from lmaas_server.main import create_app

    configure(log_level, settings.log_format)
    json_logs = {"log_config": None} if settings.log_format == "json" else {}  # uvicorn's records reach ours
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **json_logs)  # fmt: skip
    StoppingServer(config).run()


@keys.command("create")
def create(
    budget: Annotated[int, typer.Option(min=0, help="Calls the key may spend.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    token_budget: Annotated[
        Optional[int], typer.Option(min=0, help="Tokens the key may spend [default: no limit].")
    ] = None,
    rate_limit: Annotated[
        Optional[float], typer.Option(min=0.001, help="Requests per second [default: no limit].")
    ] = None,
    expires_in_days: Annotated[Optional[float], typer.Option(min=0, help="Expire after this many days.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a key and print it (alone, on the last line). It is shown only this once."""
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days is not None else None
    secret, described = _meter(database_url).create_key(budget, name, token_budget, rate_limit, expires)
    typer.echo(f"created {described.prefix} ({name or 'no name'}): budget {budget} calls", err=True)
    typer.echo(secret)


@keys.command("list")
def list_keys(database_url: DatabaseUrl = None) -> None:
    """All keys: prefix, budget, used, limits, state (never the secrets)."""
    for key in _meter(database_url).list_keys():
        state = (
            "revoked"
            if key.revoked_at
            else "expired"
            if key.expires_at and key.expires_at <= datetime.now(UTC)
            else "active"
        )
        tokens = f" tokens {key.tokens_used}/{key.token_budget}" if key.token_budget is not None else ""
        rate = f" rate {key.rate_limit:g}/s" if key.rate_limit else ""
        typer.echo(f"{key.prefix}  {state:7}  calls {key.used}/{key.budget}{tokens}{rate}  {key.name}")


@keys.command("topup")
def topup(
    prefix: Annotated[str, typer.Argument(help="The key's prefix (lmaas_xxxxxxxx).")],
    calls: Annotated[int, typer.Option(min=0, help="Calls to add.")] = 0,
    tokens: Annotated[int, typer.Option(min=0, help="Tokens to add (keys with a token budget).")] = 0,
    database_url: DatabaseUrl = None,
) -> None:
    """Add calls (and tokens) to a key's budget."""
    key = _call(lambda: _meter(database_url).top_up(prefix, calls, tokens))
    typer.echo(f"{key.prefix}: budget {key.budget} calls, {key.used} used")


@keys.command("revoke")
def revoke(prefix: Annotated[str, typer.Argument(help="The key's prefix.")], database_url: DatabaseUrl = None) -> None:
    """Revoke a key: its requests get 403 from now on."""
    key = _call(lambda: _meter(database_url).revoke(prefix))
    typer.echo(f"{key.prefix}: revoked at {key.revoked_at.isoformat()}")


def _settings(**overrides):
    from lmaas_server.config import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _meter(database_url: str | None):
    from lmaas_server.metering.meter import build_meter

    return build_meter(_settings(database_url=database_url))


def _call(fn):
    from lmaas_server.errors import APIError

    try:
        return fn()
    except APIError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
