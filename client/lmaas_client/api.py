"""The Python API: tune a prompt, load a saved one, classify texts, evaluate, see usage; task and seed given once.

    from lmaas_client import LMaaSClient, load_prompt, tune

    run = tune("sst2", method="bbt", budget=200, seed=13, out="runs/sst2-bbt", popsize=10)
    run.result.test_acc, run.result.curve, run.best_prompt      # what `lmaas tune` reports and writes
    prompt = load_prompt("runs/sst2-bbt/prompt.npz")
    prompt.classify(["a moving, funny film", "dull from start to end"])   # labels and probabilities
    prompt.evaluate("test")
    deployed = prompt.deploy("reviews")         # stored on the server: deployed.id works from any HTTP client
    load_deployed(deployed.id).classify(["a moving, funny film"])       # through POST /v1/classify
    LMaaSClient().usage()

The server and key come from `server=`/`api_key=`, a `client=`, or LMAAS_SERVER and LMAAS_API_KEY as for the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmaas_client.client import LMaaSClient
from lmaas_client.predict import DeployedPrompt, Predictor
from lmaas_client.run import Run, RunConfig
from lmaas_client.tasks import PlacementChoice, TaskSpec

__all__ = ["load_deployed", "load_prompt", "tune"]


def tune(
    task: str | TaskSpec,
    method: str = "bbt",
    *,
    budget: int,
    seed: int = 42,
    out: str | Path | None = None,
    placement: PlacementChoice = "auto",
    eval_every: int = 100,
    test_size: Any = None,
    test_at: Sequence[int] = (),
    data_dir: str | Path | None = None,
    client: LMaaSClient | None = None,
    server: str | None = None,
    api_key: str | None = None,
    **options: Any,
) -> Run:
    """Tune a prompt for `task` (a shipped task's name, a task file, or a user task built in code such as
    `hf_task(...)`) and return the finished `Run`.

    `options` are the method's settings (`popsize=10`, `calibrate=True`, ...); `seed` seeds the few-shot
    split, the projection and the optimizer alike. With `out`, the run folder is written as `lmaas tune` writes
    it (and `Run.resume(out)` continues it); without, nothing is written.
    """
    spec = task if isinstance(task, TaskSpec) else None  # saved as task.json in `out`, which the run then names
    config = RunConfig(spec.name if spec else task, method, budget, seed, placement, eval_every, test_size,
                       None if data_dir is None else str(data_dir), {**options, "seed": seed}, list(test_at))  # fmt: skip
    owned = client is None
    client = client or LMaaSClient(server, api_key=api_key)
    try:
        if out is not None:
            run = Run.create(out, config, client, task=spec)
        else:
            from lmaas_client.tasks.files import resolve_task
            from lmaas_client.tuners import make_tuner

            tuner = make_tuner(method, client.model_info(), **config.options)
            run = Run(config, client, spec or resolve_task(task), tuner)
        run.tune()
        return run
    finally:
        if owned:
            client.close()


def load_prompt(
    path: str | Path, *, client: LMaaSClient | None = None, server: str | None = None, api_key: str | None = None
) -> Predictor:
    """A saved prompt.npz bound to a server: `.classify(texts)`, `.evaluate(split)`, `.label_names`, `.deploy()`."""
    return Predictor(client or LMaaSClient(server, api_key=api_key), path)


def load_deployed(
    prompt_id: str, *, client: LMaaSClient | None = None, server: str | None = None, api_key: str | None = None
) -> DeployedPrompt:
    """A prompt deployed on the server (`Predictor.deploy`, `lmaas deploy`) by its id: `.classify(texts)`,
    `.label_names`, `.delete()`; 404 (`NotFoundError`) when it is not this key's."""
    return DeployedPrompt(client or LMaaSClient(server, api_key=api_key), prompt_id)
