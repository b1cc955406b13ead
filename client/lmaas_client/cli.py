"""`lmaas`: tune prompts against an lmaas server, re-score saved prompts and classify texts with them (deploying
and listing prompts on the server: cli_prompts.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmaas_client.calibration import Calibration
from lmaas_client.cli_prompts import deploy, prompts_app
from lmaas_client.cli_support import EXIT_BUDGET, ApiKey, Server, _errors, _rows_bar, console
from lmaas_client.cli_tasks import HFTask, UserTask, user_task_from_flags
from lmaas_client.client import DEFAULT_BASE_URL, LMaaSClient
from lmaas_client.errors import BudgetExhaustedError
from lmaas_client.evaluation import TaskScorer
from lmaas_client.peft_export import SIDECAR, export_peft
from lmaas_client.predict import DeployedPrompt, OutputFile, Predictor, predict_file
from lmaas_client.prompt_io import load_prompt
from lmaas_client.results import Progress as RunProgress
from lmaas_client.results import RunResult
from lmaas_client.run import Run, RunConfig
from lmaas_client.tasks import TASKS
from lmaas_client.tasks.data import load_split, load_test
from lmaas_client.tasks.files import is_task_file, resolve_task
from lmaas_client.tasks.hf import DEFAULT_SHOTS
from lmaas_client.tasks.readers import read_rows
from lmaas_client.tuners import TUNERS

app = typer.Typer(help="lmaas client: black-box prompt tuning over HTTP.", no_args_is_help=True)
Seed = Annotated[int, typer.Option(help="Few-shot split (16-<seed>) and tuner seed: 13, 21, 42, 87 or 100.")]
TestSize = Annotated[
    Optional[str],
    typer.Option(help="Test examples: N (stratified, fixed seed) or 'full' [default: the task's quick size, 1000 for "
                 "AG News and SNLI, else full]."),
]  # fmt: skip
DataDir = Annotated[
    Optional[Path], typer.Option(help="Folder with the task data [default: ./data or $LMAAS_DATA_DIR].")
]


@app.command()
def info(server: Server = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """Show the served model and the server's limits."""
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        typer.echo(client.model_info().model_dump_json(indent=2))


@app.command()
def usage(
    server: Server = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's JSON answer.")] = False,
) -> None:
    """Show your key's budget, calls used and remaining, and its newest requests."""
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        report = client.usage()
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    tokens = "" if report.token_budget is None else f"; tokens {report.tokens_used:,}/{report.token_budget:,}"
    console.print(f"key {report.key_prefix} ({report.name}): {report.used:,}/{report.budget:,} calls used, "
                  f"{report.remaining:,} left{tokens}")  # fmt: skip
    for entry in report.recent[:10]:
        console.print(f"  {entry.created_at:%Y-%m-%d %H:%M:%S}  {entry.endpoint:<12} {entry.calls:>4} calls  "
                      f"{entry.status}")  # fmt: skip


# Over 60 lines: typer declares each of the command's ~30 options as a parameter; the body is ~25 lines.
@app.command()
def tune(
    out: Annotated[
        Path, typer.Option(help="Run folder: run.json, checkpoint.pkl (+ .blobs/), result.json, prompt.npz, curve.png.")
    ],
    server: Server = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    task: Annotated[
        str,
        typer.Option(
            help=f"A shipped task ({', '.join(sorted(TASKS))}), a task file (.toml, .json), a Hugging Face dataset "
            "(hf:NAME[:CONFIG] or hf:FOLDER saved with save_to_disk; the `hf` extra), or your own task's name with "
            "--train etc."
        ),
    ] = "sst2",
    method: Annotated[str, typer.Option(help=f"Tuning method: {', '.join(sorted(TUNERS))}.")] = "bbt",
    budget: Annotated[int, typer.Option(min=1, help="Calls on the training set (one per candidate).")] = 8000,
    seed: Seed = 42,
    placement: Annotated[
        str,
        typer.Option(
            help="auto (suffix on causal LMs: the served text's keys/values are reused, several times cheaper per "
            "call, and it scored at or above prefix in our runs; prefix on masked LMs), prefix (as the papers) "
            "or suffix (after the text)."
        ),
    ] = "auto",
    eval_every: Annotated[int, typer.Option(min=1, help="Calls between dev evaluations.")] = 100,
    test_size: TestSize = None,
    test_at: Annotated[
        Optional[str],
        typer.Option(
            help="Learning curve on test: call counts (e.g. 100,200,500) at which the prompt selected so far is "
            "scored on the test set, as a run with that budget would end (costs test calls)."
        ),
    ] = None,
    data_dir: DataDir = None,
    popsize: Annotated[Optional[int], typer.Option(help="Shortcut for -o popsize=N.")] = None,
    prompt_length: Annotated[Optional[int], typer.Option(help="Shortcut for -o prompt_length=N.")] = None,
    intrinsic_dim: Annotated[Optional[int], typer.Option(help="Shortcut for -o intrinsic_dim=N.")] = None,
    option: Annotated[
        Optional[list[str]],
        typer.Option(
            "--option",
            "-o",
            help="Method option KEY=VALUE (repeatable). Defaults: calibrate=true (a class bias fitted on the training logits, zero calls: measured to help), select=dev, manual_floor=true (false for gdfo); bbt: popsize=10, prompt_length=10 (the paper: 20, 50); see the README.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its checkpoint (its own settings).")
    ] = False,
    train: Annotated[Optional[Path], UserTask("Your own task: training file (CSV, TSV or JSONL).")] = None,
    dev: Annotated[Optional[Path], UserTask("Your own task: dev file.")] = None,
    test: Annotated[Optional[Path], UserTask("Your own task: test file.")] = None,
    text_a: Annotated[str, UserTask("Your own task: column of the (first) text.")] = "text_a",
    text_b: Annotated[Optional[str], UserTask("Your own task: column of the second text (pairs).")] = None,
    label_column: Annotated[str, UserTask("Your own task: column of the labels.")] = "label",
    label_name: Annotated[Optional[list[str]], UserTask("Your own task: class names in order (repeat).")] = None,
    label_word: Annotated[
        Optional[list[str]], UserTask("Your own task: label word per class, e.g. ' bad' (repeat).")
    ] = None,
    template: Annotated[
        Optional[str], UserTask("Your own task: template with {text_a} and {mask} ('\\n' = newline).")
    ] = None,
    metric: Annotated[str, UserTask("Your own task: accuracy or f1.")] = "accuracy",
    hf_train_split: Annotated[str, HFTask("Split the few-shot train and dev examples are drawn from.")] = "train",
    hf_test_split: Annotated[str, HFTask("Split scored as the test set.")] = "test",
    hf_shots: Annotated[int, HFTask("Examples per class in train, and again in dev.", min=1)] = DEFAULT_SHOTS,
    hf_revision: Annotated[Optional[str], HFTask("Dataset revision on the Hub (a tag or commit).")] = None,
) -> None:
    """Tune a prompt for a task with a black-box method, under a call budget (resumable)."""
    if resume:
        with _errors():
            config, saved_server = Run.read_settings(out)
        server = server if server != DEFAULT_BASE_URL else saved_server
    else:
        options = _parse_options(option or [])
        shortcuts = {"popsize": popsize, "prompt_length": prompt_length, "intrinsic_dim": intrinsic_dim}
        options.update({k: v for k, v in shortcuts.items() if v is not None})
        options.setdefault("seed", seed)
        if placement not in ("auto", "prefix", "suffix"):
            raise typer.BadParameter("must be auto, prefix or suffix", param_hint="--placement")
        with _errors():
            hf = {
                "train_split": hf_train_split,
                "test_split": hf_test_split,
                "shots": hf_shots,
                "revision": hf_revision,
            }
            user_spec = user_task_from_flags(task, train, dev, test, text_a, text_b, label_column, label_name, label_word,
                                   template, metric, hf)  # fmt: skip
        if user_spec is not None:
            task = user_spec.name  # Run.create saves it as task.json and names that file
        elif is_task_file(task):
            task = str(Path(task).resolve())
        config = RunConfig(task, method, budget, seed, placement, eval_every, _test_size(test_size),  # type: ignore[arg-type]
                           str(data_dir) if data_dir else None, options, _call_counts(test_at))  # fmt: skip
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        run = Run.resume(out, client) if resume else Run.create(out, config, client, server=server, task=user_spec)
        with _progress_bar(config.budget) as update:
            result = run.tune(on_progress=update)
    if result.status == "budget_exhausted":
        console.print(
            f"[red]budget exhausted[/] after {result.calls_used}/{config.budget} calls; the checkpoint in {out} is "
            f"kept: top up the key and run `lmaas tune --out {out} --resume`"
        )
        raise typer.Exit(EXIT_BUDGET)
    console.print(
        f"[bold]{run.task.name}/{config.method}[/] seed {config.seed}: manual prompt {result.manual_prompt_test_acc:.4f} "
        f"(calibrated {_fmt(result.manual_calibrated_test_acc)}) -> {_handed_over(result)} {result.test_acc:.4f} test {result.metric} (best dev {_fmt(result.best_dev_acc)}); calls used "
        f"{result.calls_used}/{config.budget} (+{result.eval_calls} for dev/test); {result.seconds:.0f} s; wrote {out}"
    )


def _handed_over(result: RunResult) -> str:
    # the manual floor kept the manual prompt: say so rather than call it tuned
    return "kept the manual prompt (no tuned prompt beat it on dev)" if result.manual_kept else "tuned"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command("eval")
def evaluate(
    prompt: Annotated[Path, typer.Option(help="A prompt.npz written by `lmaas tune`.")],
    server: Server = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    task: Annotated[Optional[str], typer.Option(help="Task [default: the prompt's].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Split seed [default: the prompt's].")] = None,
    test_size: TestSize = None,
    data_dir: DataDir = None,
) -> None:
    """Re-score a saved prompt on any split; prints JSON."""
    if split not in ("train", "dev", "test"):
        raise typer.BadParameter("must be train, dev or test", param_hint="--split")
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        candidate, meta = load_prompt(prompt)
        spec = resolve_task(task or meta["task"])
        split_seed = seed if seed is not None else meta.get("seed", 42)
        if split == "test":
            examples = load_test(spec, _test_size(test_size), data_dir)
        else:
            examples = load_split(spec, split, split_seed, data_dir)  # type: ignore[arg-type]
        scorer = TaskScorer(client, spec, meta.get("placement", "prefix"))
        calibration = Calibration.from_json(meta["calibration"]) if meta.get("calibration") else None
        scores = scorer.score(examples, [candidate], calibration=calibration)[0]
    report = {"task": spec.name, "split": split, "seed": split_seed, "examples": len(examples),
              "metric": spec.metric, "score": scores.metric, "loss": scores.loss, "calls": scorer.calls,
              "calibrated": calibration is not None}  # fmt: skip
    typer.echo(json.dumps(report, indent=2))


@app.command()
def predict(
    input: Annotated[Path, typer.Option("--input", help="Texts to classify: CSV, TSV or JSONL.")],
    out: Annotated[Path, typer.Option(help="Predictions: .jsonl or .csv (continued if it exists).")],
    prompt: Annotated[Optional[Path], typer.Option(help="A prompt.npz written by `lmaas tune`.")] = None,
    deployed: Annotated[
        Optional[str], typer.Option(help="Instead of --prompt: the id of a prompt deployed with `lmaas deploy`.")
    ] = None,
    server: Server = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    text_a: Annotated[str, typer.Option(help="Column of the (first) text.")] = "text_a",
    text_b: Annotated[Optional[str], typer.Option(help="Column of the second text (pairs).")] = None,
    label_column: Annotated[str, typer.Option(help="Column of gold labels, if the file has it (accuracy).")] = "label",
    id_column: Annotated[str, typer.Option(help="Column of row ids, if the file has it [default: row number].")] = "id",
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Rows per request.")] = None,
) -> None:
    """Classify new texts with a tuned prompt: per row the label, class probabilities and id (resumable).

    With --prompt, one call per request (the evaluate accounting); with --deployed, one call per row."""
    if (prompt is None) == (deployed is None):
        raise typer.BadParameter("give either --prompt FILE or --deployed ID", param_hint="--prompt/--deployed")
    with _errors(), LMaaSClient(server, api_key=api_key) as client:
        predictor = Predictor(client, prompt) if prompt is not None else DeployedPrompt(client, deployed)
        columns = {"text_a": text_a, "label": label_column, "id": id_column, **({"text_b": text_b} if text_b else {})}
        rows = read_rows(input, columns, predictor.label_names, optional=("label", "id"))  # every check before a call
        if isinstance(predictor, DeployedPrompt):
            predictor.check_rows(rows, input)
        try:
            with _rows_bar(len(rows)) as update:
                summary = predict_file(predictor, rows, out, batch_size, on_batch=update)
        except BudgetExhaustedError as exc:
            written = len(OutputFile(out, predictor.label_names).finished_ids())
            console.print(f"[red]budget exhausted:[/] {exc}; {written}/{len(rows)} rows are in {out}: top up the "
                          "key and run the same command again to continue")  # fmt: skip
            raise typer.Exit(EXIT_BUDGET) from None
    accuracy = "" if summary.accuracy is None else f", accuracy {summary.accuracy:.4f}"
    console.print(f"{summary.rows} rows classified into {out} ({summary.calls} calls{accuracy})")


@app.command("export-peft")
def export_peft_adapter(
    prompt: Annotated[Path, typer.Argument(help="A prompt.npz written by `lmaas tune` (prefix placement).")],
    out: Annotated[
        Path, typer.Option(help=f"Adapter folder: adapter_config.json, adapter_model.safetensors, {SIDECAR}.")
    ],
    base_model: Annotated[
        str, typer.Option(help="The model the prompt was tuned on: hub id or folder, as PEFT loads it.")
    ],
    device: Annotated[str, typer.Option(help="Device to load the base model on (its embeddings are read).")] = "cpu",
) -> None:
    """Export a prefix prompt as a PEFT prompt-tuning adapter: PeftModel.from_pretrained(base, OUT) (the peft extra)."""
    with _errors():
        exported = export_peft(prompt, out, base_model, device=device)
    console.print(f"wrote a PEFT prompt-tuning adapter ({exported.virtual_tokens} virtual tokens) into {out}")
    for note in exported.notes():
        console.print(f"note: {note}")


app.command()(deploy)  # deploying and listing prompts on the server: cli_prompts.py
app.add_typer(prompts_app, name="prompts")


def _test_size(value: str | None) -> int | str | None:
    if value is None or value == "full":
        return value
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"must be a positive number or 'full', got {value!r}", param_hint="--test-size")
    return int(value)


def _call_counts(value: str | None) -> list[int]:
    if not value:
        return []
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(
            f"must be positive call counts separated by commas, got {value!r}", param_hint="--test-at"
        )
    return sorted({int(p) for p in parts})


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--option")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value  # a bare string such as loss=hinge
    return options


class _progress_bar:
    """A rich progress bar over calls used, showing the best train loss and dev score."""

    def __init__(self, budget: int):
        self.progress = Progress(
            TextColumn("[bold]tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("calls  loss {task.fields[loss]}  dev {task.fields[dev]}"),
            TimeElapsedColumn(),
            console=console,
            disable=os.environ.get("LMAAS_NO_PROGRESS") == "1",
        )
        self.task_id = self.progress.add_task("tune", total=budget, loss="-", dev="-")

    def __enter__(self):
        self.progress.start()
        return self.update

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    def update(self, state: RunProgress) -> None:
        if state.message:
            self.progress.console.print(f"[dim]{state.message}[/]")
            return
        dev = f"{state.dev_score:.4f}" if state.dev_score is not None else "-"
        self.progress.update(self.task_id, completed=state.calls_used, loss=f"{state.best_train_loss:.4f}", dev=dev)


if __name__ == "__main__":
    app()
