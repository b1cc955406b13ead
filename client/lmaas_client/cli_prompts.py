"""`lmaas deploy` and `lmaas prompts`: tuned prompts stored on the server, used by id (`lmaas predict --deployed`,
or `POST /v1/classify` from any HTTP client)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmaas_client.cli_support import ApiKey, Server, _errors, console
from lmaas_client.client import DEFAULT_BASE_URL, LMaaSClient
from lmaas_client.predict import Predictor

prompts_app = typer.Typer(help="Prompts deployed on the server for your key.", no_args_is_help=True)


def deploy(
    prompt: Annotated[Path, typer.Argument(help="A prompt.npz written by `lmaas tune`.")],
    server: Server = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    name: Annotated[str, typer.Option(help="A label for the prompt (shown by `lmaas prompts list`).")] = "",
) -> None:
    """Deploy a tuned prompt on the server (free); prints its id alone on the last line."""
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        deployed = Predictor(client, prompt).deploy(name)
    info = deployed.info
    console.print(f"deployed {prompt} on {info.model}: labels {', '.join(info.labels)}"
                  f"{', calibrated' if info.calibrated else ''}; classify with `lmaas predict --deployed {info.id}` "
                  "or POST /v1/classify")  # fmt: skip
    typer.echo(info.id)


@prompts_app.command("list")
def list_prompts(server: Server = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """Your key's deployed prompts, newest first: id, name, labels, model, when deployed."""
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        prompts = client.prompts()
    for info in prompts:
        typer.echo(f"{info.id}  {info.name or '-'}  [{', '.join(info.labels)}]  {info.model}  "
                   f"{info.created_at:%Y-%m-%d %H:%M}")  # fmt: skip
    if not prompts:
        console.print("no deployed prompts (deploy one with `lmaas deploy prompt.npz`)")


@prompts_app.command("delete")
def delete_prompt(
    prompt_id: Annotated[str, typer.Argument(help="The id `lmaas deploy` printed.")],
    server: Server = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete one of your deployed prompts."""
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        client.delete_prompt(prompt_id)
    console.print(f"deleted {prompt_id}")
