"""BBTTuner on a fake model description: projection scaling, determinism, optimisation, checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lmaas_client.prompts import ProjectedZ, PromptCandidate
from lmaas_client.tuners import TUNERS, BBTConfig, BBTTuner, make_tuner
from lmaas_client.tuners.projection import projection_spec
from lmaas_protocol import Candidate, ModelInfo, Projected, ServerLimits, materialize

HIDDEN = 16
EMBEDDING_STD = 0.1


def fake_model(vocab_size: int = 1003, hidden_size: int = HIDDEN, embedding_std: float = EMBEDDING_STD) -> ModelInfo:
    return ModelInfo(
        name="fake/model", family="masked", architecture="FakeForMaskedLM", model_type="fake", num_layers=2,
        hidden_size=hidden_size, vocab_size=vocab_size, max_length=128, embedding_std=embedding_std,
        mask_token="<mask>", mask_token_id=4, dtype="float32", device="cpu",
        limits=ServerLimits(max_candidates=64, max_examples=64, max_seq_len=128, max_prompt_length=64,
                            max_body_bytes=1 << 20),
    )  # fmt: skip


def tuner(**options) -> BBTTuner:
    options = {"intrinsic_dim": 8, "prompt_length": 3, "popsize": 6, "seed": 1, "projection_site": "client", **options}
    built = make_tuner("bbt", fake_model(), **options)
    assert isinstance(built, BBTTuner)
    return built


def distance_losses(candidates: list[PromptCandidate], target: np.ndarray) -> list[float]:
    return [float(((c.soft - target) ** 2).mean()) for c in candidates]


def run(t: BBTTuner, target: np.ndarray, generations: int) -> list[np.ndarray]:
    """ask/tell for some generations; returns every asked soft prompt, stacked per generation."""
    asked = []
    for _ in range(generations):
        candidates = t.ask()
        losses = distance_losses(candidates, target)
        t.observe(candidates, losses)
        t.tell(losses)
        asked.append(np.stack([c.soft for c in candidates]))
    return asked


def target_for(t: BBTTuner, seed: int = 0) -> np.ndarray:
    z_star = np.random.default_rng(seed).normal(0, 1, t.config.intrinsic_dim)
    return t.prompt(z_star).soft


# ----------------------------------------------------------------------------------------- projection


def test_projection_std_matches_bbt_scaling():
    config = BBTConfig(intrinsic_dim=100, prompt_length=10, alpha=1.5, sigma=2.0, seed=3)
    c = config
    projection = materialize(
        projection_spec(c.intrinsic_dim, c.sigma, c.alpha, EMBEDDING_STD, c.prompt_length, HIDDEN, c.seed)
    )
    assert projection.shape == (100, 10 * HIDDEN) and projection.dtype == np.float32
    expected = 1.5 * EMBEDDING_STD / (np.sqrt(100) * 2.0)
    assert projection.std() == pytest.approx(expected, rel=0.03)
    assert abs(projection.mean()) < 0.05 * expected


def test_prompt_elements_have_alpha_times_embedding_std():
    t = tuner(intrinsic_dim=100, prompt_length=10, alpha=1.5, sigma=2.0, popsize=64)
    z = np.random.default_rng(0).normal(0, 2.0, (200, 100))  # z ~ N(0, sigma^2 I)
    soft = np.stack([t.prompt(row).soft for row in z])
    assert soft.shape == (200, 10, HIDDEN) and soft.dtype == np.float32
    assert soft.std() == pytest.approx(1.5 * EMBEDDING_STD, rel=0.03)
    # CMA-ES's first generation samples z ~ N(0, sigma^2 I), so its prompts have that scale too
    first = np.stack([c.soft for c in t.ask()])
    assert first.std() == pytest.approx(1.5 * EMBEDDING_STD, rel=0.1)


def test_server_side_projection_sends_z_and_the_spec_and_matches_the_client_side_prompt():
    server, client = tuner(projection_site="server"), tuner(projection_site="client")
    asked = server.ask()
    wire = asked[0].to_wire()
    assert isinstance(wire.soft_prompt, Projected) and wire.soft_prompt.projection == server.spec
    assert asked[0].to_wire({server.spec.key(): "p0"}).soft_prompt.projection == "p0"
    assert wire.soft_prompt.z.shape == [8] and isinstance(asked[0].soft, ProjectedZ) and asked[0].length == 3
    np.testing.assert_array_equal(asked[0].materialized().soft, client.prompt(asked[0].z).soft)
    assert wire.prompt_token_ids == [1000, 1001, 1002]


def test_float16_wire_dtype_halves_the_z_payload():
    half = tuner(projection_site="server", wire_dtype="float16").ask()[0].to_wire()
    assert half.soft_prompt.z.dtype == "float16"


def test_prompt_is_the_projection_of_z():
    t = tuner()
    z = np.arange(8, dtype=np.float64) / 10
    candidate = t.prompt(z)
    np.testing.assert_allclose(candidate.soft.reshape(-1), z.astype(np.float32) @ materialize(t.spec), rtol=1e-6)
    np.testing.assert_array_equal(candidate.z, z)


# ----------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_asks_and_different_seeds_differ():
    first = tuner(seed=7)
    target = target_for(first)
    asked_first = run(first, target, 3)
    asked_again = run(tuner(seed=7), target, 3)
    asked_other = run(tuner(seed=8), target, 3)
    for a, b in zip(asked_first, asked_again, strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical
    assert not np.allclose(asked_first[0], asked_other[0])
    assert not np.allclose(materialize(tuner(seed=7).spec), materialize(tuner(seed=8).spec))


def test_two_tuners_with_the_same_seed_agree_when_used_side_by_side():
    a, b = tuner(seed=7), tuner(seed=7)
    z_a = np.stack([c.z for c in a.ask()])
    z_b = np.stack([c.z for c in b.ask()])
    np.testing.assert_array_equal(z_a, z_b)


def test_asks_do_not_depend_on_other_users_of_numpys_global_rng():
    quiet = tuner(seed=7)
    target = target_for(quiet)
    expected = run(quiet, target, 2)
    busy = tuner(seed=7)
    np.random.rand(10)  # someone else in the process draws from the global RNG
    observed = run(busy, target, 2)
    for a, b in zip(expected, observed, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------- optimisation


def test_ask_tell_minimises_a_reachable_target():
    t = tuner(intrinsic_dim=8, prompt_length=4, popsize=10, seed=2)
    target = target_for(t, seed=5)
    first = t.ask()
    initial = float(np.mean(distance_losses(first, target)))
    t.observe(first, distance_losses(first, target))
    t.tell(distance_losses(first, target))
    run(t, target, 40)
    assert t.best_loss < 0.01 * initial
    assert t.best is not None and t.best.soft.shape == (4, HIDDEN)
    assert distance_losses([t.best], target)[0] == pytest.approx(t.best_loss)


def test_observe_tracks_the_best_even_when_not_told():
    t = tuner()
    candidates = t.ask()
    losses = [5.0, 3.0, 4.0, 1.0, 9.0, 2.0]
    t.observe(candidates[:4], losses[:4])  # a budget's last, partial generation
    assert t.best is candidates[3] and t.best_loss == 1.0
    t.observe(candidates[4:], losses[4:])
    assert t.best is candidates[3]


def test_bound_keeps_z_in_the_box():
    t = tuner(bound=0.3, sigma=1.0, popsize=20)
    target = target_for(t)
    for _ in range(3):
        candidates = t.ask()
        assert np.abs(np.stack([c.z for c in candidates])).max() <= 0.3 + 1e-12
        t.tell(distance_losses(candidates, target))


# ----------------------------------------------------------------------------------------- checkpoints


def test_restored_tuner_continues_bit_identically():
    uninterrupted = tuner(seed=11)
    target = target_for(uninterrupted)
    run(uninterrupted, target, 4)
    state = pickle.loads(pickle.dumps(uninterrupted.state_dict()))  # as if written to a checkpoint file
    expected = run(uninterrupted, target, 4)

    np.random.seed(999)
    np.random.standard_normal(1000)  # numpy's global RNG is disturbed between checkpoint and restore
    restored = tuner(seed=11)
    np.random.standard_normal(17)
    restored.load_state_dict(state)
    assert restored.best_loss == state["best_loss"] and restored.best is not None
    observed = run(restored, target, 4)
    for a, b in zip(expected, observed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert restored.best_loss == uninterrupted.best_loss
    np.testing.assert_array_equal(restored.best.soft, uninterrupted.best.soft)


def test_restored_tuner_ignores_later_use_of_numpys_global_rng():
    original = tuner(seed=13)
    target = target_for(original)
    run(original, target, 2)
    state = original.state_dict()
    calm, busy = tuner(seed=13), tuner(seed=13)
    calm.load_state_dict(state)
    expected = run(calm, target, 3)
    busy.load_state_dict(state)
    observed = []
    for _ in range(3):
        np.random.standard_normal(3)  # other code draws between generations
        observed += run(busy, target, 1)
    for a, b in zip(expected, observed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tuners_leave_numpys_global_rng_alone():
    state = tuner(seed=14).state_dict()
    np.random.seed(2024)
    expected = np.random.RandomState(2024).standard_normal(5)
    restored = tuner(seed=14)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(np.random.standard_normal(5), expected)


def test_checkpoint_between_ask_and_tell():
    uninterrupted = tuner(seed=12)
    target = target_for(uninterrupted)
    run(uninterrupted, target, 2)
    pending = uninterrupted.ask()
    state = pickle.loads(pickle.dumps(uninterrupted.state_dict()))
    uninterrupted.tell(distance_losses(pending, target))
    expected = run(uninterrupted, target, 2)

    np.random.standard_normal(5)
    restored = tuner(seed=12)
    restored.load_state_dict(state)
    restored.tell(distance_losses(pending, target))  # the restored tuner still expects the pending losses
    observed = run(restored, target, 2)
    for a, b in zip(expected, observed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fresh_tuner_has_no_best_in_its_state():
    state = tuner().state_dict()
    assert state["best_z"] is None and state["best_loss"] == float("inf")
    restored = tuner()
    restored.load_state_dict(state)
    assert restored.best is None


# ----------------------------------------------------------------------------------------- misuse


def test_tell_needs_one_loss_per_pending_candidate():
    t = tuner(popsize=6)
    with pytest.raises(ValueError, match="one loss per candidate"):
        t.tell([1.0] * 6)  # nothing asked yet
    t.ask()
    with pytest.raises(ValueError, match="one loss per candidate"):
        t.tell([1.0] * 5)
    with pytest.raises(ValueError, match="one loss per candidate"):
        t.tell([1.0] * 7)
    t.tell([float(i) for i in range(6)])
    with pytest.raises(ValueError):
        t.tell([float(i) for i in range(6)])  # the same generation twice


def test_make_tuner_rejects_unknown_methods_and_options():
    assert "bbt" in TUNERS
    with pytest.raises(ValueError) as caught:
        make_tuner("nope", fake_model())
    assert "'nope'" in str(caught.value) and "bbt" in str(caught.value)
    with pytest.raises(ValueError) as caught:
        make_tuner("bbt", fake_model(), popsise=4)
    assert "popsise" in str(caught.value)
    with pytest.raises(ValueError) as caught:
        make_tuner("bbt", fake_model(), popsize=1)
    assert "popsize" in str(caught.value)
    with pytest.raises(ValueError) as caught:
        make_tuner("bbt", fake_model(), loss="mse")
    assert "loss" in str(caught.value)


def test_placeholder_tokens_wrap_around_the_vocabulary():
    t = tuner(prompt_length=5)
    assert t.token_ids == [1000, 1001, 1002, 0, 1]  # vocab 1003
    candidate = t.ask()[0]
    assert candidate.token_ids == [1000, 1001, 1002, 0, 1] and candidate.length == 5
    wire = candidate.to_wire()
    assert isinstance(wire, Candidate) and wire.prompt_token_ids == [1000, 1001, 1002, 0, 1]
    assert wire.soft_prompt.shape == [5, HIDDEN] and wire.soft_prompt.dtype == "float32"
    np.testing.assert_array_equal(wire.soft_prompt.to_numpy(), candidate.soft)
    small = make_tuner("bbt", fake_model(vocab_size=46), prompt_length=3, intrinsic_dim=4, init_token_offset=44)
    assert small.token_ids == [44, 45, 0]


def test_init_tokens_none_gives_pure_soft_prompts():
    t = tuner(init_tokens="none", prompt_length=4)
    assert t.token_ids is None
    candidate = t.ask()[0]
    wire = candidate.to_wire()
    assert wire.prompt_token_ids is None and wire.soft_prompt.shape == [4, HIDDEN]
    assert wire.prompt_length() == 4
    back = Candidate.model_validate_json(wire.model_dump_json(exclude_none=True))
    np.testing.assert_array_equal(back.soft_prompt.to_numpy(), candidate.soft)


# ------------------------------------------------------------------------------- instruction warm start


def test_an_instruction_base_puts_the_tasks_instruction_under_the_prompt(live_server):
    """init_tokens=instruction: z = 0 is the instruction's own tokens (a sensible prompt), not vocabulary ids."""
    from lmaas_client import LMaaSClient
    from lmaas_client.context import TuneContext
    from lmaas_client.evaluation import TaskScorer
    from lmaas_client.tasks import get_task

    task = get_task("sst2")
    with live_server() as server, LMaaSClient(server.url) as client:
        info = client.model_info()
        context = TuneContext(client, task, info, TaskScorer(client, task, "suffix"), [], [], 13, "suffix")
        vocab = make_tuner("bbt", info, popsize=3, intrinsic_dim=8, prompt_length=4, seed=1)
        instructed = make_tuner("bbt", info, popsize=3, intrinsic_dim=8, prompt_length=4, seed=1,
                                init_tokens="instruction")  # fmt: skip
        for tuner in (vocab, instructed):
            tuner.setup(context)
        expected = client.tokenize([task.instruction]).ids[0]
        own = make_tuner("bbt", info, popsize=3, intrinsic_dim=8, seed=1, init_tokens="instruction",
                         instruction="Positive or negative?")  # fmt: skip
        own.setup(context)
        own_ids = client.tokenize(["Positive or negative?"]).ids[0]
    start = instructed.prompt(np.zeros(8))
    assert start.token_ids == expected and start.token_ids != vocab.prompt(np.zeros(8)).token_ids
    assert instructed.spec.shape == [len(expected), info.hidden_size]  # P follows the instruction
    assert own.prompt(np.zeros(8)).token_ids == own_ids


def test_only_bbt_takes_an_instruction_base():
    with pytest.raises(ValueError, match="bbt only"):
        make_tuner("dept", fake_model(), popsize=3, prompt_length=2, init_tokens="instruction")


def test_the_default_configuration_is_the_measured_one_and_the_papers_is_one_option_away():
    from lmaas_client.tuners.bbt import BBTConfig

    default = BBTConfig()
    assert (default.popsize, default.prompt_length, default.intrinsic_dim, default.calibrate) == (10, 10, 500, True)
    paper = BBTConfig(popsize=20, prompt_length=50, calibrate=False)
    assert (paper.popsize, paper.prompt_length, paper.calibrate) == (20, 50, False)
