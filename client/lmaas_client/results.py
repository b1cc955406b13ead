"""What a run reports: progress while it runs, its state between checkpoints, and its result (result.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    manual_calibrated_test_acc: float | None = None  # the manual prompt after a bias fitted on train
    # the run handed over the manual prompt itself (manual floor: no tuned prompt beat it strictly on dev)
    manual_kept: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunState:
    """Everything a checkpoint holds besides the tuner."""

    calls: int = 0
    eval_calls: int = 0
    run_id: str = ""  # names the run's idempotency keys: a resumed run replays what was in flight
    manual_test: float | None = None
    manual_calibrated_test: float | None = None
    manual_calibration: dict[str, Any] | None = None  # Calibration.to_json() of the manual prompt
    best_calibration: dict[str, Any] | None = None  # of the tuner's lowest-loss prompt (calibrated runs)
    curve: list[dict[str, float | None]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
