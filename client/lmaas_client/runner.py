"""A tuning run: manual-prompt baseline, ask/score/tell under a call budget, best-on-dev selection, test.

Accounting follows the BBT paper: `calls_used` counts the calls spent on the training set (one per
candidate); scoring on dev and test is reported separately as `eval_calls` (the server charges those too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmaas_client.client import LMaaSClient
from lmaas_client.data import load_split, resolve_data_dir, stratified_subsample
from lmaas_client.evaluation import NO_PROMPT, TaskScorer
from lmaas_client.prompt_io import save_prompt
from lmaas_client.tasks import Placement, TaskSpec
from lmaas_client.tuners.base import PromptCandidate, Tuner


@dataclass
class RunConfig:
    task: str
    method: str
    budget: int  # calls on the training set
    seed: int
    placement: Placement = "prefix"
    eval_every: int = 100  # calls between dev evaluations of the best-so-far prompt (BBT: 100)
    test_size: int | None = None  # stratified, seeded test subsample; None = the full test set
    data_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    calls_used: int
    budget: int
    best_train_loss: float
    dev_score: float | None  # best dev metric so far
    eval_calls: int


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
    best_dev_acc: float
    test_acc: float
    test_size: int
    seconds: float
    best_train_loss: float
    config: dict[str, Any]
    curve: list[dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_tuning(
    client: LMaaSClient,
    task: TaskSpec,
    tuner: Tuner,
    config: RunConfig,
    out_dir: Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunResult:
    start = time.perf_counter()
    scorer = TaskScorer(client, task, config.placement)
    data_dir = resolve_data_dir(config.data_dir)
    train = load_split(task, "train", config.seed, data_dir)
    dev = load_split(task, "dev", config.seed, data_dir)
    test = stratified_subsample(load_split(task, "test", config.seed, data_dir), config.test_size, config.seed)

    manual_test = scorer.score(test, [NO_PROMPT])[0].metric
    selection = DevSelection(scorer, dev, config.eval_every)
    calls = 0
    curve: list[dict[str, float]] = []
    per_candidate = scorer.calls_per_candidate(len(train))  # > 1 only if train exceeds the server's max_examples
    while calls + per_candidate <= config.budget:
        candidates = tuner.ask()
        scored = candidates[: (config.budget - calls) // per_candidate]  # the budget may end inside a generation
        losses = [s.loss for s in scorer.score(train, scored, tuner.config.loss, cached=True)]
        calls += len(scored) * per_candidate
        tuner.observe(scored, losses)
        if len(scored) == len(candidates):
            tuner.tell(losses)
        selection.maybe_evaluate(tuner.best, calls, final=calls >= config.budget)
        curve.append({"calls": calls, "best_train_loss": tuner.best_loss, "dev_score": selection.best_score})
        if on_progress:
            on_progress(Progress(calls, config.budget, tuner.best_loss, selection.best_score, scorer.calls - calls))

    chosen = tuner.materialize(selection.best or tuner.best or NO_PROMPT)  # a portable, self-contained prompt
    test_score = scorer.score(test, [chosen])[0].metric
    info = scorer.info
    result = RunResult(
        method=config.method,
        task=task.name,
        seed=config.seed,
        budget=config.budget,
        calls_used=calls,
        eval_calls=scorer.calls - calls,
        model=info.name,
        family=info.family,
        template=scorer.template,
        metric=task.metric,
        manual_prompt_test_acc=manual_test,
        best_dev_acc=selection.best_score if selection.best_score is not None else float("nan"),
        test_acc=test_score,
        test_size=len(test),
        seconds=round(time.perf_counter() - start, 2),
        best_train_loss=tuner.best_loss,
        config={**tuner.config.model_dump(), "placement": config.placement, "eval_every": config.eval_every},
        curve=curve,
    )
    if out_dir is not None:
        save_prompt(
            out_dir / "prompt.npz",
            chosen,
            {
                "task": task.name,
                "template": scorer.template,
                "model": info.name,
                "family": info.family,
                "placement": config.placement,
                "method": config.method,
                "seed": config.seed,
            },
        )
    return result


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
