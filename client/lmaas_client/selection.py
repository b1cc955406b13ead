"""Dev selection during a run: which prompt the run would hand over if it ended now."""

from __future__ import annotations

from typing import Any

from lmaas_client.calibration import Calibration
from lmaas_client.evaluation import TaskScorer
from lmaas_client.prompts import PromptCandidate


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
        self.best_calibration: Calibration | None = None  # the selected prompt's, when the run calibrates
        self._last_scored: PromptCandidate | None = None

    def maybe_evaluate(
        self,
        candidate: PromptCandidate | None,
        calls: int,
        final: bool,
        calibration: Calibration | None = None,
        key: str | None = None,
    ) -> None:
        """Score `candidate` (after its own `calibration`, if any) on dev when an evaluation is due."""
        if candidate is None or not (final or calls >= self.next_at):
            return
        while self.next_at <= calls:
            self.next_at += self.eval_every
        if candidate is self._last_scored:
            return
        self._last_scored = candidate
        score = self.scorer.score(self.dev, [candidate], cached=True, calibration=calibration, key=key)[0].metric
        if self.best_score is None or score > self.best_score:
            self.best, self.best_score, self.best_calibration = candidate, score, calibration

    def state_dict(self) -> dict[str, Any]:
        calibration = None if self.best_calibration is None else self.best_calibration.to_json()
        return {"next_at": self.next_at, "best": self.best, "best_score": self.best_score, "last": self._last_scored,
                "calibration": calibration}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_at, self.best, self.best_score = state["next_at"], state["best"], state["best_score"]
        self._last_scored = state["last"]
        calibration = state.get("calibration")  # absent from checkpoints of before calibration
        self.best_calibration = None if calibration is None else Calibration.from_json(calibration)
