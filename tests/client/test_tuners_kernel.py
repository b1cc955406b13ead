"""The tuner kernel: one registry, one CMA-ES base for every CMA method, the loss-count check in one place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lmaas_client.tuners as tuners
from lmaas_client.tuners import TUNERS, make_tuner
from lmaas_client.tuners.base import Tuner
from lmaas_client.tuners.cmaes import CMATuner
from lmaas_client.tuners.options import CMAOptions, ProjectedPromptOptions
from tests.client.test_tuners_methods import TINY, fake_model


def test_every_method_is_registered_once_by_name():
    assert list(TUNERS) == ["manual", "icl", "bbt", "bbtv2", "bdpl", "dept", "gdfo", "prompt-tuning"]
    assert all(cls.name == name and issubclass(cls, Tuner) for name, cls in TUNERS.items())
    with pytest.raises(ValueError, match="unknown method 'nope'; available: bbt, bbtv2"):
        make_tuner("nope", fake_model())


def test_every_cma_method_uses_the_cma_base_and_shared_options():
    for name in ("bbt", "bbtv2", "dept", "gdfo"):
        cls = TUNERS[name]
        assert issubclass(cls, CMATuner), name
        assert issubclass(cls.config_class, CMAOptions) and issubclass(cls.config_class, ProjectedPromptOptions)
        assert "tell" not in vars(cls) and "ask" not in vars(cls), f"{name} re-implements ask/tell"
    assert list(TUNERS["bbt"].config_class.model_fields)[:2] == ["seed", "loss"]


def test_the_loss_count_check_is_written_once():
    folder = Path(tuners.__file__).parent
    holders = sorted(p.name for p in folder.glob("*.py") if "one loss per candidate" in p.read_text(encoding="utf-8"))
    assert holders == ["base.py"]


@pytest.mark.parametrize("method", ["bbt", "bbtv2", "dept"])
def test_tell_checks_the_count_then_updates_and_clears(method):
    tuner = make_tuner(method, fake_model(), **TINY[method])
    with pytest.raises(ValueError, match="one loss per candidate"):
        tuner.tell([1.0, 2.0, 3.0])  # nothing asked yet
    asked = tuner.ask()
    with pytest.raises(ValueError, match="one loss per candidate"):
        tuner.tell([1.0] * (len(asked) + 1))
    tuner.tell(list(np.linspace(1.0, 2.0, len(asked))))
    assert tuner._pending is None
    with pytest.raises(ValueError, match="one loss per candidate"):
        tuner.tell([1.0] * len(asked))  # told already


def test_bbtv2_moves_to_the_next_layer_through_the_kernel():
    tuner = make_tuner("bbtv2", fake_model(), **TINY["bbtv2"])
    first = tuner.strategy()
    asked = tuner.ask()
    assert all(c.meta["tuned_layer"] == 0 for c in asked)
    tuner.tell([float(i) for i in range(len(asked))])
    assert tuner.layer == 1 and tuner.strategy() is not first and tuner.best_z[0] is not None
    assert all(c.meta["tuned_layer"] == 1 for c in tuner.ask())


def test_bbtv2_gives_each_layer_its_generations_before_moving_up():
    tuner = make_tuner("bbtv2", fake_model(), **TINY["bbtv2"], generations_per_layer=2)
    layers = []
    for _ in range(4):
        asked = tuner.ask()
        layers.append(asked[0].meta["tuned_layer"])
        tuner.tell([float(i) for i in range(len(asked))])
    assert layers == [0, 0, 1, 1] and tuner.layer == 2
    assert tuner.best_z[1] is not None and tuner.best_z[2] is None  # layer 2 untouched until its turn


@pytest.mark.parametrize("method", ["bbt", "bbtv2", "dept"])
def test_diagonal_covariance_reaches_pycma_and_changes_the_search(method):
    def second_generation(covariance: str) -> tuple[np.ndarray, object]:
        tuner = make_tuner(method, fake_model(), **TINY[method], covariance=covariance)
        for _ in range(2):
            asked = tuner.ask()
            tuner.tell(list(np.linspace(1.0, 2.0, len(asked))))
        return np.array(tuner.strategy().ask()), tuner.strategy()

    full, full_es = second_generation("full")
    diagonal, diagonal_es = second_generation("diagonal")
    assert diagonal_es.opts["CMA_diagonal"] is True and full_es.opts["CMA_diagonal"] is not True
    assert not np.allclose(full, diagonal)  # same seed and losses; only the covariance model differs


@pytest.mark.parametrize("method", ["bbt", "bbtv2", "dept"])
def test_score_mean_asks_the_mean_first_and_leaves_the_search_unchanged(method):
    def two_generations(score_mean: bool) -> tuple[list, np.ndarray, np.ndarray]:
        tuner = make_tuner(method, fake_model(), **TINY[method], score_mean=score_mean)
        asked_first = tuner.ask()
        mean = np.array(tuner.strategy().mean)
        losses = list(np.linspace(1.0, 2.0, tuner.config.popsize))
        tuner.tell(([0.5] if score_mean else []) + losses)  # the mean's loss is dropped before CMA-ES sees it
        return asked_first, mean, np.array(tuner.strategy().ask())

    plain_asked, _, plain_next = two_generations(False)
    asked, mean, following = two_generations(True)
    assert len(asked) == len(plain_asked) + 1
    np.testing.assert_array_equal(asked[0].z, mean)  # the mean comes first, so a cut budget still scores it
    np.testing.assert_array_equal(following, plain_next)  # the same samples: the mean was not told


def test_a_scored_mean_with_the_lowest_loss_becomes_the_best_prompt():
    tuner = make_tuner("bbt", fake_model(), **TINY["bbt"], score_mean=True)
    asked = tuner.ask()
    losses = [0.1] + [1.0] * (len(asked) - 1)
    tuner.observe(asked, losses)
    tuner.tell(losses)
    assert tuner.best is asked[0] and tuner.best_loss == pytest.approx(0.1)
    tuner.ask()
    with pytest.raises(ValueError, match="one loss per candidate"):  # the mean counts among the candidates
        tuner.tell([1.0] * tuner.config.popsize)


def test_the_manual_floor_is_on_by_default_only_for_the_black_box_methods_it_was_measured_with():
    defaults = {name: cls.config_class().manual_floor for name, cls in TUNERS.items() if name != "gdfo"}
    assert defaults == {"manual": False, "icl": False, "bbt": True, "bbtv2": True, "bdpl": True, "dept": True,
                        "prompt-tuning": False}  # fmt: skip
    assert TUNERS["gdfo"].config_class.model_fields["manual_floor"].default is False
    assert TUNERS["bbtv2"].config_class(manual_floor=False).manual_floor is False
