"""Dev selection during a run: which prompt the run would hand over if it ended now."""

from __future__ import annotations

from typing import Any, Literal

from lmaas_client.calibration import Calibration
from lmaas_client.evaluation import TaskScorer
from lmaas_client.prompts import PromptCandidate

# How the run picks the prompt it hands over among the best-so-far (lowest train loss) prompts it met:
# - "dev": the highest dev metric, the first on ties (BBT's way; 32 dev examples give a coarse metric);
# - "dev-loss": the lowest dev loss (continuous, so fewer ties and less luck than a 1/32-step accuracy);
# - "train+dev": the lowest loss over train and dev together (weighted by their sizes): the dev score of a
#   prompt found on train, without letting 32 dev examples alone decide;
# - "train": no dev evaluations at all (no calls): the lowest training loss, i.e. the search's own best.
SelectName = Literal["dev", "dev-loss", "train+dev", "train"]
SELECT_MODES: tuple[str, ...] = ("dev", "dev-loss", "train+dev", "train")


class DevSelection:
    """BBT's model selection: every `eval_every` calls, score the best-so-far (lowest train loss) prompt on
    dev and keep the best one by `mode`. A prompt already scored is not scored again."""

    def __init__(self, scorer: TaskScorer, dev, eval_every: int, mode: SelectName = "dev", train_size: int = 0,
                 loss: str = "ce"):  # fmt: skip
        if mode not in SELECT_MODES:  # never fall through to another mode's key
            raise ValueError(f"select={mode!r}: expected one of {', '.join(SELECT_MODES)}")
        self.scorer = scorer
        self.dev = dev
        self.eval_every = max(1, eval_every)
        self.mode = mode
        self.train_size = train_size  # weights the train loss in "train+dev"
        self.loss = loss  # the search's loss, so that train and dev losses add up in "train+dev"
        self.next_at = self.eval_every
        self.best: PromptCandidate | None = None
        self.best_score: float | None = None  # the selected prompt's dev metric (what results report)
        self.best_key: float | None = None  # what `mode` compares: higher is better
        self.best_calibration: Calibration | None = None  # the selected prompt's, when the run calibrates
        self._last_scored: PromptCandidate | None = None

    def maybe_evaluate(
        self,
        candidate: PromptCandidate | None,
        calls: int,
        final: bool,
        calibration: Calibration | None = None,
        key: str | None = None,
        train_loss: float | None = None,
    ) -> None:
        """Score `candidate` (after its own `calibration`, if any) on dev when an evaluation is due;
        `train_loss` is its loss on the training set (the search's, for "train+dev")."""
        if self.mode == "train" or candidate is None or not (final or calls >= self.next_at):
            return
        while self.next_at <= calls:
            self.next_at += self.eval_every
        if candidate is self._last_scored:
            return
        self._last_scored = candidate
        self.consider(candidate, calibration, key, train_loss)

    def consider(self, candidate: PromptCandidate, calibration: Calibration | None, key: str | None,
                 train_loss: float | None) -> None:  # fmt: skip
        """Score `candidate` on dev now, outside the schedule (the manual floor: scored first, it keeps its place
        unless a later prompt beats it strictly)."""
        if self.mode == "train":
            return
        scores = self.scorer.score(self.dev, [candidate], self.loss, cached=True, calibration=calibration, key=key)[0]
        ranked = self._key(scores.metric, scores.loss, train_loss)
        if self.best_key is None or ranked > self.best_key:
            self.best, self.best_score, self.best_key = candidate, scores.metric, ranked
            self.best_calibration = calibration

    def _key(self, metric: float, dev_loss: float, train_loss: float | None) -> float:
        if self.mode == "dev":
            return metric
        if self.mode == "dev-loss" or train_loss is None:
            return -dev_loss
        n_dev = len(self.dev)
        return -(self.train_size * train_loss + n_dev * dev_loss) / (self.train_size + n_dev)

    def state_dict(self) -> dict[str, Any]:
        calibration = None if self.best_calibration is None else self.best_calibration.to_json()
        return {"next_at": self.next_at, "best": self.best, "best_score": self.best_score, "last": self._last_scored,
                "calibration": calibration, "best_key": self.best_key}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_at, self.best, self.best_score = state["next_at"], state["best"], state["best_score"]
        self._last_scored = state["last"]
        # absent from checkpoints of before these fields: the dev metric was the key
        self.best_key = state.get("best_key", self.best_score)
        calibration = state.get("calibration")
        self.best_calibration = None if calibration is None else Calibration.from_json(calibration)
