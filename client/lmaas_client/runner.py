"""A tuning run: manual-prompt baseline, ask/score/tell under a call budget, best-on-dev selection, test.

Accounting follows the BBT paper: `calls_used` counts the calls spent on the training set (one per
candidate); scoring on dev and test is reported separately as `eval_calls` (the server charges those too).
After every generation the run writes a checkpoint (tuner state, RNG states inside it, best prompts,
calls, curve); `resume=True` continues from it and ends as an uninterrupted run with the same seed would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmaas_client import checkpoints
from lmaas_client.client import LMaaSClient
from lmaas_client.context import TuneContext
from lmaas_client.errors import BudgetExhaustedError
from lmaas_client.evaluation import NO_PROMPT, TaskScorer
from lmaas_client.plots import plot_curve
from lmaas_client.prompt_io import save_prompt
from lmaas_client.prompts import PromptCandidate
from lmaas_client.tasks import Placement, TaskSpec
from lmaas_client.tasks.data import TestSize, load_task_data
from lmaas_client.tuners.base import Tuner

CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_VERSION = 1


@dataclass
class RunConfig:
    task: str
    method: str
    budget: int  # calls on the training set
    seed: int
    placement: Placement = "prefix"
    eval_every: int = 100  # calls between dev evaluations of the best-so-far prompt (BBT: 100)
    test_size: TestSize = None  # None: the task's quick subsample (full for small sets); "full"; or N examples
    data_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # Learning curve on test: at the first generation that reaches each of these call counts, the run does
    # what a run with that budget would do at its end (a final dev evaluation, then the selected prompt on
    # test) and records the score in the curve; the test calls count as eval_calls.
    test_at: list[int] = field(default_factory=list)


@dataclass
class Progress:
    calls_used: int
    budget: int
    best_train_loss: float
    dev_score: float | None  # best dev metric so far
    eval_calls: int
    message: str | None = None  # a stage starting (e.g. scoring the test set), for the progress display


@dataclass
class RunResult:
    method: str
    task: str
    seed: int
    budget: int
    calls_used: int
    eval_calls: int
    model: str
    family: str
    template: str
    metric: str
    manual_prompt_test_acc: float
    best_dev_acc: float | None
    test_acc: float | None
    test_size: int
    test_full_size: int
    seconds: float
    best_train_loss: float
    status: str  # "completed" or "budget_exhausted" (the checkpoint is kept; resume after a top-up)
    config: dict[str, Any]
    curve: list[dict[str, float | None]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunState:
    """Everything a checkpoint holds besides the tuner."""

    calls: int = 0
    eval_calls: int = 0
    manual_test: float | None = None
    curve: list[dict[str, float | None]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run_tuning(
    client: LMaaSClient,
    task: TaskSpec,
    tuner: Tuner,
    config: RunConfig,
    out_dir: Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    resume: bool = False,
) -> RunResult:
    start = time.perf_counter()
    notify = on_progress or (lambda _: None)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    scorer = TaskScorer(client, task, config.placement)
    data = load_task_data(task, config.seed, config.data_dir, config.test_size)
    train, dev, test = data.train, data.dev, data.test
    state = RunState()
    selection = DevSelection(scorer, dev, config.eval_every)
    if resume:
        state = load_checkpoint(out_dir, tuner, selection)
    context = TuneContext(client, task, scorer.info, scorer, train, dev, config.seed, config.placement, resume)
    tuner.setup(context)

    def progress(message: str | None = None) -> None:
        notify(Progress(state.calls, config.budget, tuner.best_loss, selection.best_score, state.eval_calls, message))

    status = "completed"
    try:
        if state.manual_test is None:
            progress(f"scoring the manual prompt on {len(test)} test examples")
            state.manual_test = _counted(scorer, state, lambda: scorer.score(test, [NO_PROMPT])[0].metric)
        search(scorer, tuner, train, selection, state, config, out_dir, progress, start, test)
        chosen = (selection.best or tuner.best or NO_PROMPT).materialized()  # portable, self-contained
        last = state.curve[-1] if state.curve else {}
        if chosen.empty and state.manual_test is not None:  # the manual prompt again: already scored
            test_score = state.manual_test
        elif last.get("calls") == state.calls and last.get("test_score") is not None:  # scored at a --test-at point
            test_score = last["test_score"]
        else:
            progress(f"scoring the selected prompt on {len(test)} test examples")
            test_score = _counted(scorer, state, lambda: scorer.score(test, [chosen])[0].metric)
    except BudgetExhaustedError:
        status, test_score = "budget_exhausted", None
        chosen = (selection.best or tuner.best or NO_PROMPT).materialized()
    state.seconds += time.perf_counter() - start
    result = _result(
        config, task, scorer, tuner, selection, state, test_score, (len(test), data.test_full_size), status
    )
    if out_dir is not None:
        meta = {"task": config.task, "template": scorer.template, "model": scorer.info.name, "family": scorer.info.family,
                "placement": config.placement, "method": config.method, "seed": config.seed}  # fmt: skip
        save_prompt(out_dir / "prompt.npz", chosen, meta)
        plot_curve(
            result.curve, out_dir / "curve.png", f"{task.name} / {config.method} / seed {config.seed}", task.metric
        )
    return result


def search(
    scorer, tuner: Tuner, train, selection, state: RunState, config: RunConfig, out_dir, progress, start, test=()
) -> None:
    """ask -> score on train (one call per candidate) -> tell, until the budget is spent."""
    pending_tests = sorted(p for p in set(config.test_at) if p > state.calls)
    per_candidate = scorer.calls_per_candidate(len(train))  # > 1 only if train exceeds the server's max_examples
    while tuner.black_box and state.calls + per_candidate <= config.budget:
        candidates = tuner.ask()
        if not candidates:
            break
        scored = candidates[: (config.budget - state.calls) // per_candidate]  # the budget may end mid-generation
        results = scorer.score(train, scored, tuner.config.loss, cached=True)
        state.calls += len(scored) * per_candidate
        losses = [r.loss for r in results]
        tuner.observe(scored, losses)
        if len(scored) == len(candidates):
            tuner.tell(losses, [r.logits for r in results])
        before = scorer.calls
        test_now = bool(pending_tests) and state.calls >= pending_tests[0]
        final = test_now or state.calls + per_candidate > config.budget
        selection.maybe_evaluate(tuner.best, state.calls, final=final)
        point = {"calls": state.calls, "best_train_loss": tuner.best_loss, "dev_score": selection.best_score}
        if test_now:
            pending_tests = [p for p in pending_tests if p > state.calls]
            chosen = (selection.best or tuner.best or NO_PROMPT).materialized()
            point["test_score"] = scorer.score(test, [chosen])[0].metric
        state.eval_calls += scorer.calls - before
        state.curve.append(point)
        if out_dir is not None:
            save_checkpoint(out_dir, tuner, selection, state, start)
        progress()


def _counted(scorer: TaskScorer, state: RunState, fn: Callable[[], Any]) -> Any:
    """Run fn and add the calls it charged to eval_calls."""
    before = scorer.calls
    try:
        return fn()
    finally:
        state.eval_calls += scorer.calls - before


def _result(config, task, scorer, tuner, selection, state, test_score, test_sizes, status) -> RunResult:
    info = scorer.info
    return RunResult(
        method=config.method,
        task=task.name,
        seed=config.seed,
        budget=config.budget,
        calls_used=state.calls,
        eval_calls=state.eval_calls,
        model=info.name,
        family=info.family,
        template=scorer.template,
        metric=task.metric,
        manual_prompt_test_acc=state.manual_test if state.manual_test is not None else float("nan"),
        best_dev_acc=selection.best_score,
        test_acc=test_score,
        test_size=test_sizes[0],
        test_full_size=test_sizes[1],
        seconds=round(state.seconds, 2),
        best_train_loss=tuner.best_loss,
        status=status,
        config={**tuner.config.model_dump(), "placement": config.placement, "eval_every": config.eval_every},
        curve=state.curve,
    )


class DevSelection:
    """BBT's model selection: every `eval_every` calls, score the best-so-far (lowest train loss) prompt on
    dev and keep the best-on-dev one. A prompt already scored is not scored again."""

    def __init__(self, scorer: TaskScorer, dev, eval_every: int):
        self.scorer = scorer
        self.dev = dev
        self.eval_every = max(1, eval_every)
        self.next_at = self.eval_every
        self.best: PromptCandidate | None = None
        self.best_score: float | None = None
        self._last_scored: PromptCandidate | None = None

    def maybe_evaluate(self, candidate: PromptCandidate | None, calls: int, final: bool) -> None:
        if candidate is None or not (final or calls >= self.next_at):
            return
        while self.next_at <= calls:
            self.next_at += self.eval_every
        if candidate is self._last_scored:
            return
        self._last_scored = candidate
        score = self.scorer.score(self.dev, [candidate], cached=True)[0].metric
        if self.best_score is None or score > self.best_score:
            self.best, self.best_score = candidate, score

    def state_dict(self) -> dict[str, Any]:
        return {"next_at": self.next_at, "best": self.best, "best_score": self.best_score, "last": self._last_scored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_at, self.best, self.best_score = state["next_at"], state["best"], state["best_score"]
        self._last_scored = state["last"]


def save_checkpoint(out_dir: Path, tuner: Tuner, selection: DevSelection, state: RunState, start: float) -> None:
    """Atomically replace out_dir/checkpoint.pkl; large unchanged parts are not written again (`checkpoints`)."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "tuner": tuner.state_dict(),
        "tuner_best": (tuner.best, tuner.best_loss),
        "selection": selection.state_dict(),
        "state": {**asdict(state), "seconds": state.seconds + time.perf_counter() - start},
    }
    checkpoints.save(out_dir / CHECKPOINT, payload)


def load_checkpoint(out_dir: Path | None, tuner: Tuner, selection: DevSelection) -> RunState:
    path = (out_dir or Path(".")) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    payload = checkpoints.load(path)
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION}")
    tuner.load_state_dict(payload["tuner"])
    tuner.best, tuner.best_loss = payload["tuner_best"]
    selection.load_state_dict(payload["selection"])
    return RunState(**payload["state"])


def write_run_config(out_dir: Path, config: RunConfig, server: str) -> None:
    """The run's settings, so `lmaas tune --resume DIR` can rebuild the same run."""
    (out_dir / "run.json").write_text(json.dumps({**asdict(config), "server": server}, indent=2) + "\n")


def read_run_config(out_dir: Path) -> tuple[RunConfig, str]:
    path = out_dir / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a run folder (no run.json)")
    data = json.loads(path.read_text())
    server = data.pop("server")
    return RunConfig(**data), server
