"""A tuning run: the object that owns its settings, state, dev selection, checkpoint and run folder.

    run = Run.create("runs/sst2-bbt", RunConfig(task="sst2", method="bbt", budget=8000, seed=42), client)
    result = run.tune()            # manual-prompt baseline, ask/score/tell under the budget, selection, test
    run.best_prompt                # the selected prompt (self-contained: projections computed here)
    Run.resume("runs/sst2-bbt", client).tune()   # after a crash or a budget top-up

Accounting follows the BBT paper: `calls_used` counts the calls spent on the training set (one per
candidate); scoring on dev and test is reported separately as `eval_calls` (the server charges those too).
After every generation the run writes a checkpoint (tuner state, RNG states inside it, best prompts,
calls, curve); a resumed run ends as an uninterrupted run with the same seed would.

The run folder, every file written here: run.json (settings, so `lmaas tune --resume` rebuilds the run),
task.json (a task given by the CLI's flags), checkpoint.pkl (+ checkpoint.pkl.blobs/), prompt.npz, curve.png
and result.json.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmaas_client import checkpoints
from lmaas_client.calibration import Calibration
from lmaas_client.client import LMaaSClient
from lmaas_client.context import TuneContext
from lmaas_client.errors import BudgetExhaustedError
from lmaas_client.evaluation import NO_PROMPT, Scores, TaskScorer
from lmaas_client.plots import plot_curve
from lmaas_client.prompt_io import save_prompt
from lmaas_client.prompts import PromptCandidate
from lmaas_client.results import Progress, RunResult, RunState
from lmaas_client.selection import DevSelection
from lmaas_client.tasks import PlacementChoice, TaskSpec
from lmaas_client.tasks.data import TaskData, TestSize, load_task_data
from lmaas_client.tasks.files import resolve_task, save_task_file
from lmaas_client.tuners import make_tuner
from lmaas_client.tuners.base import Tuner
from lmaas_protocol import scoring

RUN_JSON, TASK_JSON, RESULT_JSON, CHECKPOINT, PROMPT_FILE, CURVE_FILE = (
    "run.json", "task.json", "result.json", "checkpoint.pkl", "prompt.npz", "curve.png"
)  # fmt: skip
CHECKPOINT_VERSION = 1

__all__ = ["CHECKPOINT", "Progress", "Run", "RunConfig", "RunResult", "run_tuning"]


@dataclass
class RunConfig:
    task: str  # a shipped task's name or a task file's path
    method: str
    budget: int  # calls on the training set
    seed: int
    placement: PlacementChoice = "auto"  # auto: suffix on causal LMs, prefix on masked ones (Run resolves it)
    eval_every: int = 100  # calls between dev evaluations of the best-so-far prompt (BBT: 100)
    test_size: TestSize = None  # None: the task's quick subsample (full for small sets); "full"; or N examples
    data_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # Learning curve on test: at the first generation that reaches each of these call counts, the run does
    # what a run with that budget would do at its end (a final dev evaluation, then the selected prompt on
    # test) and records the score in the curve; the test calls count as eval_calls.
    test_at: list[int] = field(default_factory=list)


class Run:
    """One tuning run. Build it with `create` (a new folder) or `resume` (an existing one); then `tune()`."""

    # set by tune(): the scorer, the task's examples and the dev selection of this run
    scorer: TaskScorer
    data: TaskData
    selection: DevSelection

    def __init__(self, config: RunConfig, client: LMaaSClient, task: TaskSpec, tuner: Tuner,
                 folder: str | Path | None = None, *, server: str | None = None, resumed: bool = False,
                 owns_client: bool = False):  # fmt: skip
        if config.placement == "auto":  # resolved once; run.json keeps the placement actually used
            config = replace(config, placement=task.auto_placement(client.model_info().family))
        self.config, self.client, self.task, self.tuner = config, client, task, tuner
        self.folder = None if folder is None else Path(folder)
        self.server = server or client.base_url
        self.resumed = resumed
        self.state = RunState()
        self.result: RunResult | None = None
        self.best_prompt: PromptCandidate | None = None
        self._owns_client = owns_client

    # ------------------------------------------------------------------------------------------- building

    @classmethod
    def create(cls, folder: str | Path, config: RunConfig, client: LMaaSClient | None = None, *,
               server: str | None = None, api_key: str | None = None, task: TaskSpec | None = None) -> Run:  # fmt: skip
        """A new run in `folder` (run.json written now); without a client, one to `server` that the run closes.

        `task`: a user task built in code (the CLI's flags); it is saved as task.json in the folder and
        `config.task` names that file, so the run can be resumed and its prompt re-scored later.
        """
        if task is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            config = replace(config, task=str(save_task_file(task, Path(folder) / TASK_JSON).resolve()))
        owned = client is None
        client = client or LMaaSClient(server, api_key=api_key)
        try:
            task = resolve_task(config.task)
            tuner = make_tuner(config.method, client.model_info(), **config.options)
            run = cls(config, client, task, tuner, folder, server=server, owns_client=owned)
            run.folder.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            run._write_settings()
        except BaseException:
            if owned:
                client.close()
            raise
        return run

    @classmethod
    def resume(cls, folder: str | Path, client: LMaaSClient | None = None, *, api_key: str | None = None) -> Run:
        """The run in `folder`, continued from its checkpoint by `tune()`; without a client, one to its server."""
        config, server = cls.read_settings(folder)
        owned = client is None
        client = client or LMaaSClient(server, api_key=api_key)
        try:
            tuner = make_tuner(config.method, client.model_info(), **config.options)
            return cls(config, client, resolve_task(config.task), tuner, folder, server=server, resumed=True,
                       owns_client=owned)  # fmt: skip
        except BaseException:
            if owned:
                client.close()
            raise

    @staticmethod
    def read_settings(folder: str | Path) -> tuple[RunConfig, str]:
        """run.json: the run's settings and the server it ran against."""
        path = Path(folder) / RUN_JSON
        if not path.exists():
            raise FileNotFoundError(f"{path}: not a run folder (no run.json)")
        data = json.loads(path.read_text())
        server = data.pop("server")
        return RunConfig(**data), server

    def _write_settings(self) -> None:
        data = {**asdict(self.config), "server": self.server}
        (self.folder / RUN_JSON).write_text(json.dumps(data, indent=2) + "\n")  # type: ignore[operator]

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- tuning

    def tune(self, on_progress: Callable[[Progress], None] | None = None) -> RunResult:
        """Run to the end of the budget (or until the key's budget runs out); writes every output file."""
        start = time.perf_counter()
        self._notify = on_progress or (lambda _: None)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        config = self.config
        if self.resumed and (finished := self._finished_result()) is not None:
            return finished  # a completed run resumed: nothing to do, nothing to pay
        self.scorer = TaskScorer(self.client, self.task, config.placement)
        self.data = load_task_data(self.task, config.seed, config.data_dir, config.test_size)
        self.selection = DevSelection(
            self.scorer,
            self.data.dev,
            config.eval_every,
            getattr(self.tuner.config, "select", "dev"),
            len(self.data.train),
            self.tuner.config.loss,
        )
        if self.resumed:
            self.state = self._load_checkpoint()
        self.state.run_id = self.state.run_id or uuid.uuid4().hex  # saved with the first checkpoint
        self.tuner.setup(TuneContext(self.client, self.task, self.scorer.info, self.scorer, self.data.train,
                                     self.data.dev, config.seed, config.placement, self.resumed))  # fmt: skip
        status, test_score = "completed", None
        try:
            test_score = self._search_and_test(start)
        except BudgetExhaustedError:
            status = "budget_exhausted"
            self.best_prompt = self._chosen()
        self.state.seconds += time.perf_counter() - start
        self.result = self._result(test_score, status)
        self._write_outputs()
        return self.result

    def _key(self, step: str) -> str:
        """The idempotency key of one evaluation of this run: the same step after a resume, the same key."""
        return f"run-{self.state.run_id}-{step}"

    def _finished_result(self) -> RunResult | None:
        path = None if self.folder is None else self.folder / RESULT_JSON
        if path is None or not path.exists():
            return None
        saved = json.loads(path.read_text())
        if saved.get("status") != "completed":
            return None
        self.result = RunResult(**saved)
        return self.result

    def _progress(self, message: str | None = None) -> None:
        s = self.state
        self._notify(Progress(s.calls, self.config.budget, self.tuner.best_loss, self.selection.best_score,
                              s.eval_calls, message))  # fmt: skip

    def _chosen(self) -> PromptCandidate:
        """The prompt the run hands over now: best on dev, else lowest train loss, else the manual prompt."""
        return (self.selection.best or self.tuner.best or NO_PROMPT).materialized()  # portable, self-contained

    @property
    def _calibrating(self) -> bool:
        return bool(getattr(self.tuner.config, "calibrate", False))

    def _chosen_calibration(self) -> Calibration | None:
        """The calibration that goes with `_chosen()` (None when the run does not calibrate)."""
        if not self._calibrating:
            return None
        if self.selection.best is not None:
            return self.selection.best_calibration
        fitted = self.state.best_calibration if self.tuner.best is not None else self.state.manual_calibration
        return None if fitted is None else Calibration.from_json(fitted)

    def _search_and_test(self, start: float) -> float:
        state, test = self.state, self.data.test
        if state.manual_test is None:
            self._progress(f"scoring the manual prompt on {len(test)} test examples")
            manual = self._counted(
                lambda: self.scorer.score(test, [NO_PROMPT], cached=True, key=self._key("manual"))[0]
            )
            # the calibrated manual prompt: the zero-tuning baseline every run reports (one call on train)
            train = self._counted(lambda: self.scorer.score(self.data.train, [NO_PROMPT], cached=True, calibrate=True,
                                                            key=self._key("mcal"))[0])  # fmt: skip
            state.manual_calibrated_test = self._calibrated_manual(train, manual.logits)
            if getattr(self.tuner.config, "manual_floor", False):
                self._counted(lambda: self._manual_floor(train))
            state.manual_test = manual.metric
        self._search(start)
        self.best_prompt = chosen = self._chosen()
        last = state.curve[-1] if state.curve else {}
        if chosen.empty and state.manual_test is not None:  # the manual prompt again: already scored
            return state.manual_calibrated_test if self._calibrating else state.manual_test  # type: ignore[return-value]
        if last.get("calls") == state.calls and last.get("test_score") is not None:  # scored at a --test-at point
            return last["test_score"]  # type: ignore[return-value]
        self._progress(f"scoring the selected prompt on {len(test)} test examples")
        return self._counted(lambda: self._test_score(chosen, "final"))

    def _test_score(self, chosen: PromptCandidate, step: str) -> float:
        # cached: the test set's text keys/values are computed once per run, not at every curve point
        calibration = self._chosen_calibration()
        return self.scorer.score(self.data.test, [chosen], cached=True, calibration=calibration,
                                 key=self._key(step))[0].metric  # fmt: skip

    def _calibrated_manual(self, train: Scores, test_logits) -> float:
        """The manual prompt's test metric after the bias fitted on its training logits (`train`)."""
        self.state.manual_calibration = train.calibration.to_json()  # type: ignore[union-attr]
        labels = np.array([e.label for e in self.data.test])
        return scoring.score(self.task.metric, train.calibration.apply(test_logits), labels)  # type: ignore[union-attr]

    def _manual_floor(self, train: Scores) -> None:
        """Put the manual prompt (with its training-set bias when the run calibrates) into dev selection first:
        a tuned prompt must then beat it strictly on dev to be handed over (one dev call)."""
        calibration = train.calibration if self._calibrating else None
        labels = np.array([e.label for e in self.data.train])
        logits = calibration.apply(train.logits) if calibration is not None else train.logits
        train_loss = scoring.loss(self.tuner.config.loss, logits, labels, self.task.metric)  # for select=train+dev
        self.selection.consider(NO_PROMPT, calibration, self._key("devmanual"), train_loss)

    def _search(self, start: float) -> None:
        """ask -> score on train (one call per candidate) -> tell, until the budget is spent."""
        config, state, tuner, scorer, train = self.config, self.state, self.tuner, self.scorer, self.data.train
        pending_tests = sorted(p for p in set(config.test_at) if p > state.calls)
        per_candidate = scorer.calls_per_candidate(len(train))  # > 1 only if train exceeds the server's max_examples
        while tuner.black_box and state.calls + per_candidate <= config.budget:
            candidates = tuner.ask()
            if not candidates:
                break
            scored = candidates[: (config.budget - state.calls) // per_candidate]  # the budget may end mid-generation
            results = scorer.score(train, scored, tuner.config.loss, cached=True, calibrate=self._calibrating,
                                   key=self._key(f"train{state.calls}"))  # fmt: skip
            state.calls += len(scored) * per_candidate
            losses = [r.loss for r in results]
            tuner.observe(scored, losses)
            for candidate, result in zip(scored, results, strict=True):
                if candidate is tuner.best and result.calibration is not None:  # keep the new best's calibration
                    state.best_calibration = result.calibration.to_json()
            if len(scored) == len(candidates):
                tuner.tell(losses, [r.logits for r in results])
            before = scorer.calls
            test_now = bool(pending_tests) and state.calls >= pending_tests[0]
            final = test_now or state.calls + per_candidate > config.budget
            best_calibration = Calibration.from_json(state.best_calibration) if state.best_calibration else None
            self.selection.maybe_evaluate(tuner.best, state.calls, final=final, calibration=best_calibration,
                                          key=self._key(f"dev{state.calls}"), train_loss=tuner.best_loss)  # fmt: skip
            point = {"calls": state.calls, "best_train_loss": tuner.best_loss, "dev_score": self.selection.best_score}
            if test_now:
                pending_tests = [p for p in pending_tests if p > state.calls]
                point["test_score"] = self._test_score(self._chosen(), f"test{state.calls}")
            state.eval_calls += scorer.calls - before
            state.curve.append(point)
            if self.folder is not None:
                self._save_checkpoint(start)
            self._progress()

    def _counted(self, fn: Callable[[], Any]) -> Any:
        """Run fn and add the calls it charged to eval_calls."""
        before = self.scorer.calls
        try:
            return fn()
        finally:
            self.state.eval_calls += self.scorer.calls - before

    # ------------------------------------------------------------------------------------------- files

    def _save_checkpoint(self, start: float) -> None:
        """Atomically replace checkpoint.pkl; large unchanged parts are not written again (`checkpoints`)."""
        payload = {
            "version": CHECKPOINT_VERSION,
            "tuner": self.tuner.state_dict(),
            "tuner_best": (self.tuner.best, self.tuner.best_loss),
            "selection": self.selection.state_dict(),
            "state": {**asdict(self.state), "seconds": self.state.seconds + time.perf_counter() - start},
        }
        checkpoints.save(self.folder / CHECKPOINT, payload)  # type: ignore[operator]

    def _load_checkpoint(self) -> RunState:
        path = (self.folder or Path(".")) / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        payload = checkpoints.load(path)
        if payload.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION}")
        self.tuner.load_state_dict(payload["tuner"])
        self.tuner.best, self.tuner.best_loss = payload["tuner_best"]
        self.selection.load_state_dict(payload["selection"])
        return RunState(**payload["state"])

    def _manual_kept(self) -> bool:
        """The manual floor handed over the manual prompt (not the `manual` method, whose prompt it is anyway)."""
        floor = bool(getattr(self.tuner.config, "manual_floor", False))
        return floor and self.best_prompt is not None and self.best_prompt.empty

    def _result(self, test_score: float | None, status: str) -> RunResult:
        config, info, state, data = self.config, self.scorer.info, self.state, self.data
        return RunResult(
            method=config.method, task=self.task.name, seed=config.seed, budget=config.budget,
            calls_used=state.calls, eval_calls=state.eval_calls, model=info.name, family=info.family,
            template=self.scorer.template, metric=self.task.metric,
            manual_prompt_test_acc=state.manual_test if state.manual_test is not None else float("nan"),
            best_dev_acc=self.selection.best_score, test_acc=test_score, test_size=len(data.test),
            test_full_size=data.test_full_size, seconds=round(state.seconds, 2), best_train_loss=self.tuner.best_loss,
            status=status, curve=state.curve, manual_calibrated_test_acc=state.manual_calibrated_test,
            manual_kept=self._manual_kept(),
            config={**self.tuner.config.model_dump(), "placement": config.placement, "eval_every": config.eval_every},
        )  # fmt: skip

    def _write_outputs(self) -> None:
        if self.folder is None or self.result is None:
            return
        config, info = self.config, self.scorer.info
        meta = {"task": config.task, "template": self.scorer.template, "model": info.name, "family": info.family,
                "placement": config.placement, "method": config.method, "seed": config.seed}  # fmt: skip
        calibration = self._chosen_calibration()
        if calibration is not None:
            meta["calibration"] = calibration.to_json()  # `lmaas eval` and `lmaas predict` apply it
        save_prompt(self.folder / PROMPT_FILE, self.best_prompt or self._chosen(), meta)
        title = f"{self.task.name} / {config.method} / seed {config.seed}"
        plot_curve(self.result.curve, self.folder / CURVE_FILE, title, self.task.metric)
        (self.folder / RESULT_JSON).write_text(json.dumps(self.result.to_json(), indent=2) + "\n")


def run_tuning(client: LMaaSClient, task: TaskSpec, tuner: Tuner, config: RunConfig, out_dir: Path | None = None,
               on_progress: Callable[[Progress], None] | None = None, resume: bool = False) -> RunResult:  # fmt: skip
    """A run from parts already built (the tests', benchmarks' way in); `Run.create`/`Run.resume` build them."""
    return Run(config, client, task, tuner, out_dir, resumed=resume).tune(on_progress)
