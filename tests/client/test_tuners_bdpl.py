"""BDPLTuner: candidate vocabulary, seeded sampling, policy gradient, simplex projection, checkpoints, a real run."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest

import lmaas_client.client as client_module
from lmaas_client import LMaaSClient
from lmaas_client.context import TuneContext
from lmaas_client.prompt_io import load_prompt
from lmaas_client.run import RunConfig, run_tuning
from lmaas_client.tasks import get_task
from lmaas_client.tuners import TUNERS, make_tuner
from lmaas_client.tuners.bdpl import (
    BDPLConfig,
    BDPLTuner,
    build_vocabulary,
    has_word,
    is_special,
    policy_gradient,
    project_simplex,
    sample_rows,
)
from lmaas_protocol import Example, TokenizeResponse
from tests.client.test_tuners_bbt import fake_model
from tests.conftest import REPO
from tests.support.crash import Crash, crash_after

DATA = str(REPO / "data")
VOCAB = [f"w{i}" for i in range(40)]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.001)


def tuner(vocab_size: int = 12, **options) -> BDPLTuner:
    options = {"prompt_length": 3, "num_candidates": 12, "num_samples": 6, "seed": 1, "lr": 0.05, **options}
    built = make_tuner("bdpl", fake_model(), **options)
    assert isinstance(built, BDPLTuner)
    built.set_vocabulary(range(500, 500 + vocab_size), [f"t{i}" for i in range(vocab_size)])
    return built


def position0_losses(t: BDPLTuner, candidates, good: int) -> list[float]:
    """The synthetic objective: 0 if the token at position 0 is `good`, else 1."""
    return [0.0 if c.token_ids[0] == good else 1.0 for c in candidates]


def run(t: BDPLTuner, steps: int, good: int = 507) -> list[list[list[int]]]:
    asked = []
    for _ in range(steps):
        candidates = t.ask()
        losses = position0_losses(t, candidates, good)
        t.observe(candidates, losses)
        t.tell(losses)
        asked.append([c.token_ids for c in candidates])
    return asked


# ----------------------------------------------------------------------------------------- vocabulary


@dataclass
class FakeClient:
    """tokenize() by whitespace, ids from a fixed table; records each request."""

    table: dict[str, int]
    requests: list[tuple[list[str], bool]] = field(default_factory=list)

    def tokenize(self, texts, *, add_special_tokens=False, return_tokens=False) -> TokenizeResponse:
        self.requests.append((list(texts), return_tokens))
        tokens = [text.split() for text in texts]
        ids = [[self.table[w] for w in row] for row in tokens]
        return TokenizeResponse(ids=ids, tokens=tokens if return_tokens else None)


SPECIALS = ["<s>", "<mask>", "[UNK]", "[PAD]", "Ġ", "▁", "<0x0A>", "MASKTOKEN"]
TABLE = {w: i for i, w in enumerate([*SPECIALS, "the", "movie", "is", "great", "bad", "fun", "Ġ.", ",", "Ġplot", "ok"])}
TEXTS = [  # "<s> the movie is" 8 times, PMI-joined; "Ġ." and "," frequent but wordless
    "<s> the movie is great Ġ. [UNK] Ġ",
    "<s> the movie is bad , <mask> ▁",
    "<s> the movie is fun Ġ. [PAD] <0x0A>",
    "<s> the movie is great , MASKTOKEN",
    "<s> the movie is bad Ġ. Ġplot",
    "<s> the movie is fun , ok",
    "<s> the movie is great Ġ.",
    "<s> the movie is bad ,",
]


def context(texts=TEXTS, max_examples: int = 64, resumed: bool = False) -> TuneContext:
    info = fake_model().model_copy(update={"mask_token_id": TABLE["MASKTOKEN"]})
    info = info.model_copy(update={"limits": info.limits.model_copy(update={"max_examples": max_examples})})
    train = [Example(text_a=t, label=i % 2) for i, t in enumerate(texts)]
    return TuneContext(FakeClient(TABLE), get_task("sst2"), info, None, train, [], 0, "prefix", resumed)  # type: ignore[arg-type]


def test_special_token_strings():
    for token in [
        "<s>",
        "</s>",
        "<mask>",
        "<|endoftext|>",
        "<0x0A>",
        "[UNK]",
        "[PAD]",
        "[MASK]",
        "Ġ",
        "▁",
        "Ċ",
        " ",
        "",
    ]:
        assert is_special(token), token
    for token in ["the", "Ġthe", "▁great", "##ing", ".", "<", "a>", "[x]", "Ġ<"]:
        assert not is_special(token), token
    assert [has_word(t) for t in ["Ġthe", "▁a", "7", "Ġ,", "▁.", "Ċ", "...", "'s"]] == [True] * 3 + [False] * 4 + [True]


def test_vocabulary_takes_pmi_ngrams_first_and_excludes_special_tokens():
    t = make_tuner("bdpl", fake_model(), num_candidates=200, ngram_min_count=5)
    ctx = context()
    t.setup(ctx)
    names = {i: w for w, i in TABLE.items()}
    words = [names[i] for i in t.vocab]
    # n-grams (count > 5): "the movie is" (8, PMI-joined); the rest are single tokens by frequency
    assert words[:3] == ["the", "movie", "is"] and t.vocab_info["from_ngrams"] == 3
    assert words[3:] == ["great", "bad", "fun", "Ġplot", "ok"]  # 3, 3, 2, 1, 1 times: ties by id
    assert not set(words) & {*SPECIALS, "Ġ.", ","}  # special, mask token, whitespace, wordless
    assert t.vocab_tokens == words and t.probs.shape == (10, 8)
    np.testing.assert_array_equal(t.probs, 1 / 8)
    assert ctx.client.requests == [(TEXTS, True)]  # one tokenize call, with the token strings


def test_vocabulary_is_deterministic_and_independent_of_the_text_order():
    first = make_tuner("bdpl", fake_model(), num_candidates=200)
    first.setup(context())
    again = make_tuner("bdpl", fake_model(), num_candidates=200)
    again.setup(context(texts=TEXTS[::-1], max_examples=3))  # other order, tokenized in chunks of 3
    np.testing.assert_array_equal(first.vocab, again.vocab)
    small = make_tuner("bdpl", fake_model(), num_candidates=4)
    small.setup(context())
    np.testing.assert_array_equal(small.vocab, first.vocab[:4])
    assert small.probs.shape == (10, 4)


def test_vocabulary_falls_back_to_frequent_tokens_on_tiny_data():
    ids = [[1, 2, 3], [3, 4], [3, 5, 2]]
    tokens = [["a", "b", "c"], ["c", "d"], ["c", "e", "b"]]
    vocab, info = build_vocabulary(ids, tokens, size=4)
    assert vocab == [3, 2, 1, 4] and info == {"from_ngrams": 0, "from_unigrams": 4}
    vocab, _ = build_vocabulary(ids, tokens, size=100, excluded={3})
    assert vocab == [2, 1, 4, 5]  # fewer than asked: the distribution is that narrow


def test_setup_after_a_resume_keeps_the_loaded_vocabulary():
    t = tuner()
    state = t.state_dict()
    restored = make_tuner("bdpl", fake_model(), prompt_length=3, num_candidates=12, num_samples=6, seed=1)
    restored.load_state_dict(state)
    ctx = context(resumed=True)
    restored.setup(ctx)
    assert ctx.client.requests == [] and list(restored.vocab) == list(range(500, 512))


def test_ask_needs_a_vocabulary():
    t = make_tuner("bdpl", fake_model())
    with pytest.raises(RuntimeError, match="setup"):
        t.ask()


# ----------------------------------------------------------------------------------------- sampling


def test_asks_are_seeded_and_reproducible():
    a, b, other = tuner(seed=7), tuner(seed=7), tuner(seed=8)
    asked = run(a, 3)
    assert asked == run(b, 3)
    assert asked != run(other, 3)
    first = asked[0]
    assert len(first) == 6 and all(len(ids) == 3 and all(500 <= i < 512 for i in ids) for ids in first)
    assert a.ask()[0].meta["prompt_tokens"][0].startswith("t")


def test_asks_do_not_depend_on_numpys_global_rng():
    expected = run(tuner(seed=7), 3)
    np.random.seed(0)
    state = np.random.get_state()
    busy = tuner(seed=7)
    observed = []
    for _ in range(3):
        np.random.standard_normal(7)  # someone else draws between steps
        observed += run(busy, 1)
    assert observed == expected
    quiet = tuner(seed=7)
    np.random.set_state(state)
    run(quiet, 2)
    np.testing.assert_array_equal(np.random.standard_normal(4), np.random.RandomState(0).standard_normal(4))


def test_sampling_follows_the_distribution_and_never_draws_zero_probabilities():
    probs = np.array([[0.0, 0.7, 0.0, 0.3], [0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    draws = sample_rows(probs, 20_000, np.random.default_rng(3))
    for i, row in enumerate(probs):
        frequency = np.bincount(draws[:, i], minlength=4) / len(draws)
        np.testing.assert_allclose(frequency, row, atol=0.015)
        assert not np.isin(draws[:, i], np.flatnonzero(row == 0)).any()


# ----------------------------------------------------------------------------------------- optimisation


def test_policy_gradient_raises_the_probability_of_a_token_that_gives_lower_loss():
    t = tuner(seed=3)
    good = 507
    run(t, 60, good)
    column = good - 500
    assert t.probs[0, column] > 0.5 and t.probs[0].argmax() == column
    assert t.best.token_ids[0] == good and t.best == t.argmax_prompt()
    assert t.best_loss == 0.0 and t.best_sampled.token_ids[0] == good


def test_gradient_is_the_variance_reduced_score_function():
    probs = np.full((2, 3), 1 / 3)
    samples = np.array([[0, 1], [0, 2], [1, 2]])
    losses = np.array([1.0, 2.0, 6.0])  # mean 3: advantages -2, -1, 3, / (I - 1) = 2
    grad = policy_gradient(probs, samples, losses)
    expected = np.array([[(-2 - 1) / 2 * 3, 3 / 2 * 3, 0.0], [0.0, -2 / 2 * 3, (-1 + 3) / 2 * 3]])
    np.testing.assert_allclose(grad, expected)
    assert policy_gradient(probs, samples, np.full(3, 4.0)).sum() == 0  # equal losses: no signal


def test_zero_probabilities_never_give_inf_or_nan():
    probs = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    grad = policy_gradient(probs, np.array([[0, 2], [1, 1]]), np.array([0.0, 1.0]))  # zero entries forced
    assert np.isfinite(grad).all()
    t = tuner(vocab_size=5, lr=1.0, num_samples=4)  # a huge lr drives most entries to exactly 0
    for _ in range(30):
        candidates = t.ask()
        t.tell(position0_losses(t, candidates, 502))
        assert np.isfinite(t.probs).all() and np.isfinite(t.m).all() and np.isfinite(t.v).all()
    assert (t.probs == 0).any()
    np.testing.assert_allclose(t.probs.sum(axis=1), 1.0)


def test_simplex_projection_rows_are_distributions_and_the_nearest_ones():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, width = rng.integers(1, 6), rng.integers(1, 300)
        x = rng.normal(0, 10 ** rng.uniform(-4, 2), (n, width)) + rng.uniform(-1, 1)
        p = project_simplex(x)
        assert p.shape == x.shape and (p >= 0).all(), trial
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
        # optimality (KKT): p = max(x - theta, 0) with one theta per row
        for row_x, row_p in zip(x, p, strict=True):
            support = row_p > 0
            theta = (row_x - row_p)[support]
            np.testing.assert_allclose(theta, theta[0], atol=1e-9)
            assert (row_x[~support] <= theta[0] + 1e-9).all()
    on = rng.dirichlet(np.ones(50), size=4)
    np.testing.assert_allclose(project_simplex(on), on, atol=1e-15)  # already on the simplex: unchanged
    with pytest.raises(ValueError, match="non-finite"):
        project_simplex(np.array([[np.nan, 1.0]]))


def test_gradient_is_clipped_to_norm_three():
    t = tuner(lr=0.01, clip_norm=3.0)
    candidates = t.ask()
    losses = [1000.0 * i for i in range(len(candidates))]
    grad = policy_gradient(t.probs, t._pending, np.array(losses))
    assert np.linalg.norm(grad) > 3
    t.tell(losses)
    # Adam's first step: m = 0.1 g, v = 0.001 g^2, so the step is lr * sign(g) wherever g != 0
    np.testing.assert_allclose(np.sqrt(t.v.sum() / (1 - 0.999)), 3.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------- selection


def test_argmax_best_is_kept_as_the_same_object_while_the_argmax_does_not_change():
    t = tuner(lr=1e-6)  # tiny steps: the argmax quickly settles
    run(t, 1)
    best = t.best
    assert best is not None and best.token_ids == [int(t.vocab[i]) for i in t.argmax_indices()]
    for _ in range(3):
        candidates = t.ask()
        t.observe(candidates, [5.0] * len(candidates))
        t.tell([5.0] * len(candidates))  # equal losses: zero gradient, Adam keeps its direction
        assert t.best is best


def test_best_sampled_selection_keeps_a_copy_of_the_lowest_loss_prompt():
    t = tuner(best_from="best_sampled")
    candidates = t.ask()
    losses = [5.0, 3.0, 4.0, 1.0, 9.0, 2.0]
    t.observe(candidates, losses)
    assert t.best.token_ids == candidates[3].token_ids and t.best_loss == 1.0
    expected = list(candidates[3].token_ids)
    candidates[3].token_ids[0] = -1  # the asked object changes later: the best does not
    assert t.best.token_ids == expected and t.best is not candidates[3]
    t.tell(losses)
    assert t.best.token_ids == expected


def test_argmax_selection_still_reports_the_lowest_sampled_loss():
    t = tuner()
    candidates = t.ask()
    t.observe(candidates, [3.0, 2.0, 1.5, 4.0, 5.0, 6.0])
    assert t.best_loss == 1.5 and t.best_sampled.token_ids == candidates[2].token_ids
    assert t.best.token_ids == [500, 500, 500]  # uniform: the first (most frequent) candidate everywhere


# ----------------------------------------------------------------------------------------- checkpoints


def test_restored_tuner_continues_bit_identically():
    uninterrupted = tuner(seed=11)
    run(uninterrupted, 4)
    state = pickle.loads(pickle.dumps(uninterrupted.state_dict()))
    expected = run(uninterrupted, 4)

    np.random.seed(999)
    np.random.standard_normal(100)
    restored = make_tuner("bdpl", fake_model(), prompt_length=3, num_candidates=12, num_samples=6, seed=11, lr=0.05)
    restored.load_state_dict(state)
    assert run(restored, 4) == expected
    np.testing.assert_array_equal(restored.probs, uninterrupted.probs)
    np.testing.assert_array_equal(restored.m, uninterrupted.m)
    assert restored.step == uninterrupted.step == 8
    assert restored.best_loss == uninterrupted.best_loss
    assert restored.best.token_ids == uninterrupted.best.token_ids
    assert restored.best_sampled.token_ids == uninterrupted.best_sampled.token_ids


def test_checkpoint_between_ask_and_tell():
    uninterrupted = tuner(seed=12)
    run(uninterrupted, 2)
    pending = uninterrupted.ask()
    state = pickle.loads(pickle.dumps(uninterrupted.state_dict()))
    uninterrupted.tell(position0_losses(uninterrupted, pending, 507))
    expected = run(uninterrupted, 2)

    restored = tuner(seed=99)  # other seed and vocabulary: everything comes from the state
    restored.load_state_dict(state)
    restored.tell(position0_losses(restored, pending, 507))
    assert run(restored, 2) == expected


def test_state_is_a_copy():
    t = tuner()
    state = t.state_dict()
    run(t, 2)
    np.testing.assert_array_equal(state["probs"], 1 / 12)
    assert state["step"] == 0 and state["best_sampled"] is None and state["pending"] is None


# ----------------------------------------------------------------------------------------- misuse


def test_config_errors():
    assert TUNERS["bdpl"] is BDPLTuner and BDPLTuner.config_class is BDPLConfig
    for options, name in [({"prompt_length": 0}, "prompt_length"), ({"num_samples": 1}, "num_samples"),
                          ({"num_candidates": 1}, "num_candidates"), ({"lr": 0}, "lr"),
                          ({"select": "mean"}, "select"), ({"temperature": 1}, "temperature")]:  # fmt: skip
        with pytest.raises(ValueError) as caught:
            make_tuner("bdpl", fake_model(), **options)
        assert name in str(caught.value)
    with pytest.raises(ValueError, match="max_prompt_length"):
        make_tuner("bdpl", fake_model(), prompt_length=65)  # the fake server allows 64


def test_tell_needs_one_finite_loss_per_pending_candidate():
    t = tuner(num_samples=4)
    with pytest.raises(ValueError, match="one loss per candidate"):
        t.tell([1.0] * 4)
    t.ask()
    with pytest.raises(ValueError, match="one loss per candidate"):
        t.tell([1.0] * 3)
    with pytest.raises(ValueError, match="finite"):
        t.tell([1.0, float("nan"), 1.0, 1.0])
    t.tell([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="one loss per candidate"):
        t.tell([1.0, 2.0, 3.0, 4.0])


# ----------------------------------------------------------------------------------------- end to end

TINY = {"num_samples": 4, "prompt_length": 3, "num_candidates": 20, "lr": 0.01}


def tune(url: str, budget: int, out_dir=None, on_progress=None, resume=False, **options):
    with LMaaSClient(url) as client:
        options = {**TINY, "seed": 13, **options}
        config = RunConfig(task="sst2", method="bdpl", budget=budget, seed=13, placement="suffix", eval_every=4,
                           test_size=16, data_dir=DATA, options=options)  # fmt: skip
        tuner = make_tuner("bdpl", client.model_info(), **options)
        result = run_tuning(client, get_task("sst2"), tuner, config, out_dir, on_progress, resume=resume)
        return result, tuner


def test_bdpl_runs_end_to_end(live_server, tmp_path):
    with live_server("llama", budget=1000) as server:
        result, t = tune(server.url, budget=8, out_dir=tmp_path)
        charged = server.server.config.app.state.budget.used
    assert result.calls_used == 8 and result.status == "completed" and t.step == 2
    assert charged == result.calls_used + result.eval_calls
    assert len(t.vocab) == 20 and not any(is_special(s) for s in t.vocab_tokens)
    assert [p["calls"] for p in result.curve] == [4, 8] and result.test_acc is not None
    assert (
        result.config["num_candidates"] == 20
        and result.config["best_from"] == "argmax"
        and result.config["select"] == "dev"
    )
    prompt, meta = load_prompt(tmp_path / "prompt.npz")
    assert len(prompt.token_ids) == 3 and set(prompt.token_ids) <= set(t.vocab.tolist())
    assert meta["method"] == "bdpl" and len(meta["prompt_tokens"]) == 3


def test_a_resumed_bdpl_run_ends_like_an_uninterrupted_one(live_server, tmp_path):
    with live_server("llama", budget=10_000) as server:
        straight, _ = tune(server.url, budget=12, out_dir=tmp_path / "straight")
        with pytest.raises(Crash):
            tune(server.url, budget=12, out_dir=tmp_path / "resumed", on_progress=crash_after(8))
        resumed, _ = tune(server.url, budget=12, out_dir=tmp_path / "resumed", resume=True)
    assert resumed.calls_used == straight.calls_used == 12
    assert resumed.curve == straight.curve and resumed.eval_calls == straight.eval_calls
    assert resumed.best_dev_acc == straight.best_dev_acc and resumed.test_acc == straight.test_acc
    with np.load(tmp_path / "straight" / "prompt.npz") as a, np.load(tmp_path / "resumed" / "prompt.npz") as b:
        np.testing.assert_array_equal(a["prompt_token_ids"], b["prompt_token_ids"])


def test_bdpl_shares_the_dev_selection_mode_and_reads_old_run_folders():
    from lmaas_client.tuners.bdpl import BDPLConfig

    assert BDPLConfig().select == "dev" and BDPLConfig(select="dev-loss").select == "dev-loss"
    old = BDPLConfig.model_validate({"select": "best_sampled", "lr": 0.01})  # a run folder of before the rename
    assert old.best_from == "best_sampled" and old.select == "dev" and old.lr == 0.01
