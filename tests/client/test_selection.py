"""Dev selection modes: each picks a different prompt from the same scores, and "train" spends no calls."""

import numpy as np
import pytest

from lmaas_client.evaluation import Scores
from lmaas_client.prompts import PromptCandidate
from lmaas_client.selection import DevSelection


class FakeScorer:
    """Dev scores per candidate (metric, loss), counted like the real scorer's calls."""

    def __init__(self, table):
        self.table = table
        self.calls = 0
        self.losses = []

    def score(self, examples, candidates, loss="ce", cached=False, calibration=None, key=None):
        self.calls += len(candidates)
        self.losses.append(loss)
        metric, dev_loss = self.table[id(candidates[0])]
        return [Scores(np.zeros((len(examples), 2)), dev_loss, metric)]


A, B, C = PromptCandidate(token_ids=[1]), PromptCandidate(token_ids=[2]), PromptCandidate(token_ids=[3])
# candidate: (dev accuracy, dev loss), train loss. A is lucky on 32 dev examples; B has the lower dev loss;
# C fits train best and dev second best, so it wins over train and dev together.
DEV = {id(A): (0.75, 0.60), id(B): (0.72, 0.50), id(C): (0.72, 0.52)}
TRAIN = {id(A): 0.55, id(B): 0.50, id(C): 0.30}


def select(mode: str) -> tuple[DevSelection, FakeScorer]:
    scorer = FakeScorer(DEV)
    selection = DevSelection(scorer, dev=[object()] * 32, eval_every=10, mode=mode, train_size=32, loss="hinge")
    for step, candidate in enumerate((A, B, C), start=1):
        selection.maybe_evaluate(candidate, calls=10 * step, final=False, train_loss=TRAIN[id(candidate)])
    return selection, scorer


@pytest.mark.parametrize(("mode", "chosen"), [("dev", A), ("dev-loss", B), ("train+dev", C)])
def test_each_mode_keeps_its_own_best(mode, chosen):
    selection, scorer = select(mode)
    assert selection.best is chosen
    assert selection.best_score == DEV[id(chosen)][0]  # results report the dev metric whatever the mode
    assert scorer.calls == 3 and set(scorer.losses) == {"hinge"}  # dev scored with the search's loss


def test_train_mode_spends_no_dev_calls():
    selection, scorer = select("train")
    assert scorer.calls == 0 and selection.best is None  # the run then hands over the search's best


def test_state_round_trips_and_old_checkpoints_rank_by_the_metric():
    selection, _ = select("dev-loss")
    state = selection.state_dict()
    again = DevSelection(FakeScorer(DEV), dev=[object()] * 32, eval_every=10, mode="dev-loss")
    again.load_state_dict(state)
    assert again.best_key == pytest.approx(-0.50) and again.next_at == selection.next_at
    old = {k: v for k, v in state.items() if k != "best_key"}
    again.load_state_dict(old)
    assert again.best_key == state["best_score"]


def test_the_manual_floor_keeps_its_place_on_ties_and_yields_only_to_a_strictly_better_prompt():
    manual, better = PromptCandidate(), PromptCandidate(token_ids=[4])
    scorer = FakeScorer({**DEV, id(manual): (0.75, 0.58), id(better): (0.78, 0.40)})
    selection = DevSelection(scorer, dev=[object()] * 32, eval_every=10, mode="dev")
    selection.consider(manual, calibration=None, key="devmanual", train_loss=None)
    selection.maybe_evaluate(A, calls=10, final=False)  # 0.75: a tie, the manual prompt stays
    assert selection.best is manual and scorer.calls == 2
    selection.maybe_evaluate(better, calls=20, final=False)
    assert selection.best is better and selection.best_score == 0.78


def test_the_manual_floor_costs_nothing_without_dev_selection():
    scorer = FakeScorer(DEV)
    selection = DevSelection(scorer, dev=[object()] * 32, eval_every=10, mode="train")
    selection.consider(PromptCandidate(), calibration=None, key=None, train_loss=None)
    assert scorer.calls == 0 and selection.best is None


def test_an_unknown_mode_is_refused_instead_of_falling_through():
    with pytest.raises(ValueError, match="select='argmax': expected one of dev, dev-loss"):
        DevSelection(FakeScorer(DEV), dev=[object()] * 32, eval_every=10, mode="argmax")
