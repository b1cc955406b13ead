"""White-box parts of the client (the optional `local` extra) on tiny random models: the local model renders
and scores exactly as the server does, prompt tuning trains, GDFO distils, injects and resumes exactly."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import cma
import numpy as np
import pytest

from lmaas_client import LMaaSClient
from lmaas_client.evaluation import TaskScorer
from lmaas_client.local_model import LocalModelError, load_local
from lmaas_client.prompt_io import load_prompt
from lmaas_client.prompts import PromptCandidate
from lmaas_client.run import RunConfig, run_tuning
from lmaas_client.tasks import get_task
from lmaas_client.tasks.data import load_split
from lmaas_client.tuners import TUNERS, make_tuner
from lmaas_client.tuners.gdfo import GDFOTuner
from lmaas_client.tuners.prompt_tuning import PromptTuning
from tests.conftest import REPO
from tests.support.crash import Crash, crash_after

torch = pytest.importorskip("torch")
from lmaas_runtime.frozen import FrozenLM, project  # noqa: E402

DATA = REPO / "data"
SST2 = get_task("sst2")
TRAIN = load_split(SST2, "train", 42, DATA)
DEV = load_split(SST2, "dev", 42, DATA)
GDFO_TINY = {"popsize": 4, "prompt_length": 3, "intrinsic_dim": 8, "student_rank": 2, "distill_batch": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP stalls (50x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_models(tiny_model_dirs):
    cache: dict[str, FrozenLM] = {}

    def get(kind: str) -> FrozenLM:
        if kind not in cache:
            cache[kind] = load_local(str(tiny_model_dirs[kind]))
        return cache[kind]

    return get


def soft_prompt(length: int, hidden: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, (length, hidden)).astype(np.float32)


# ----------------------------------------------------------------------------------------- local model


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "gpt2"])
@pytest.mark.parametrize("placement", ["prefix", "suffix"])
def test_the_local_tokenizer_renders_the_servers_tokens(engines, local_models, kind, placement):
    engine, local = engines(kind), local_models(kind)
    template = SST2.template(local.family, placement)
    examples = [*TRAIN, *DEV]
    for length in (0, 5):
        ours = local.render(template, examples, length, max_length=engine.max_length)
        theirs = engine.renderer.render(template, examples, length, True)
        assert [(r.ids, r.prompt_at, r.mask_at) for r in ours] == [(r.ids, r.prompt_at, r.mask_at) for r in theirs]
    assert local.max_length == engine.max_length  # same default limit (the server's max_seq_len and the model's)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "roberta"])
@pytest.mark.parametrize("placement", ["prefix", "suffix"])
def test_local_logits_equal_the_servers(live_server, local_models, kind, placement):
    local = local_models(kind)
    soft = soft_prompt(5)
    candidates = [PromptCandidate(soft=soft), PromptCandidate(token_ids=[5, 6, 7, 8, 9], soft=soft)]
    with live_server(kind) as server, LMaaSClient(server.url) as client:
        scorer = TaskScorer(client, SST2, placement)
        served = scorer.logits(TRAIN, candidates, cached=True)  # suffix + causal: the server's prefix cache
        info = scorer.info
    assert local.mismatch(info) is None
    rendered = local.render(scorer.template, TRAIN, 5, max_length=info.max_length)
    for cache_text in (False, True):
        examples = local.prepare(rendered, cache_text)
        assert (examples.prefix is not None) == (cache_text and placement == "suffix" and local.causal)
        for candidate, expected in zip(candidates, served, strict=True):
            with torch.no_grad():
                ours = local.class_logits(examples, scorer.verbalizer, torch.from_numpy(soft), candidate.token_ids)
            assert ours.shape == (32, 2)
            np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("placement", ["prefix", "suffix"])
def test_gradients_reach_the_soft_prompt_and_a_projected_z_on_both_paths(local_models, placement):
    local = local_models("llama")
    verbalizer = local.label_ids(SST2.label_words["causal"])
    rendered = local.render(SST2.template("causal", placement), TRAIN[:6], 3)
    matrix = torch.from_numpy(np.random.default_rng(1).normal(0, 0.05, (4, 3 * 32)).astype(np.float32))
    grads = []
    for cache_text in (False, True):
        z = torch.tensor([0.3, -0.2, 0.1, 0.5], requires_grad=True)
        logits = local.class_logits(local.prepare(rendered, cache_text), verbalizer, project(z, matrix, (3, 32)))
        torch.nn.functional.cross_entropy(logits, torch.tensor([e.label for e in TRAIN[:6]])).backward()
        grads.append(z.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert not any(p.requires_grad for p in local.model.parameters())  # the model itself stays frozen


def test_per_row_prompts_and_subsets_agree_with_one_shared_prompt(local_models):
    local = local_models("gpt2")
    verbalizer = local.label_ids(SST2.label_words["causal"])
    examples = local.prepare(local.render(SST2.template("causal", "suffix"), TRAIN[:5], 2))
    a, b = torch.from_numpy(soft_prompt(2, seed=1)), torch.from_numpy(soft_prompt(2, seed=2))
    with torch.no_grad():
        shared_a = local.class_logits(examples, verbalizer, a)
        shared_b = local.class_logits(examples, verbalizer, b)
        rows = local.class_logits(examples.subset([4, 0, 4]), verbalizer, torch.stack([a, b, b]))
    torch.testing.assert_close(rows, torch.stack([shared_a[4], shared_b[0], shared_b[4]]), atol=1e-5, rtol=0)


def test_the_local_loader_needs_no_lmaas_server_and_loads_the_same_model(tiny_model_dirs, local_models, monkeypatch):
    for module in ("lmaas_server", "lmaas_server.model_loading", "lmaas_server.config"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of the server fails, as if not installed
    minimal = load_local(str(tiny_model_dirs["roberta"]))
    reference = local_models("roberta")
    assert (minimal.name, minimal.family, minimal.max_length) == (
        reference.name,
        reference.family,
        reference.max_length,
    )
    rendered = reference.render(SST2.template("masked", "prefix"), TRAIN[:4], 2)
    verbalizer = reference.label_ids(SST2.label_words["masked"])
    with torch.no_grad():
        soft = torch.from_numpy(soft_prompt(2))
        torch.testing.assert_close(minimal.class_logits(rendered, verbalizer, soft),
                                   reference.class_logits(rendered, verbalizer, soft))  # fmt: skip
    with pytest.raises(LocalModelError, match="not found"):
        load_local("/nonexistent/model.gguf")


def test_mismatch_names_the_difference(engines, local_models):
    assert local_models("llama").mismatch(engines("llama").info) is None
    assert "gpt2" in local_models("llama").mismatch(engines("gpt2").info)
    info = engines("llama").info.model_copy(update={"embedding_std": engines("llama").info.embedding_std * 1.5})
    assert "embedding std" in local_models("llama").mismatch(info)


# ----------------------------------------------------------------------------------------- prompt tuning


@pytest.fixture(scope="module")
def sharp_llama(tiny_model_dirs) -> FrozenLM:
    """The tiny llama with its LM head scaled x30: random tiny models barely react to a prompt otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return FrozenLM(model, AutoTokenizer.from_pretrained(tiny_model_dirs["llama"]), "sharp-llama", "causal", 512)


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_prompt_tuning_reduces_the_training_loss_and_returns_a_pure_soft_prompt(sharp_llama, optimizer):
    local = sharp_llama
    tuner = make_tuner("prompt-tuning", None, prompt_length=4, epochs=12, seed=3, optimizer=optimizer)
    assert isinstance(tuner, PromptTuning) and tuner.black_box is False
    words = SST2.label_words["causal"]
    tuner.train_prompt(local, SST2.template("causal", "suffix"), local.label_ids(words), words, TRAIN, DEV)
    initial = tuner.history[0]["train_loss"]
    assert len(tuner.history) == 13
    assert tuner.history[-1]["train_loss"] < 0.8 * initial
    assert tuner.best is not None and tuner.best.token_ids is None and tuner.best.soft.shape == (4, 32)
    assert tuner.best.soft.dtype == np.float32
    best_epoch = tuner.best.meta["best_epoch"]
    assert tuner.history[best_epoch]["dev_score"] == max(h["dev_score"] for h in tuner.history)
    rendered = local.render(SST2.template("causal", "suffix"), TRAIN, 4)
    with torch.no_grad():
        logits = local.class_logits(rendered, local.label_ids(words), torch.from_numpy(tuner.best.soft))
    labels = torch.tensor([e.label for e in TRAIN])
    assert tuner.best_loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    # the first rows start at the label words' embeddings
    tuner0 = make_tuner("prompt-tuning", None, prompt_length=4, epochs=0)
    tuner0.train_prompt(local, SST2.template("causal", "suffix"), local.label_ids(words), words, TRAIN, DEV)
    first = local.tokenizer(words[0], add_special_tokens=False)["input_ids"]
    expected = local.embedding(torch.tensor(first)).mean(0).detach().numpy()
    np.testing.assert_allclose(tuner0.best.soft[0], expected, rtol=1e-6)
    assert tuner0.state_dict()["best_soft"].shape == (4, 32) and tuner0.ask() == []


def run_method(url: str, method: str, budget: int, options: dict, out_dir=None, placement="suffix", **kwargs):
    with LMaaSClient(url) as client:
        config = RunConfig(task="sst2", method=method, budget=budget, seed=13, placement=placement, eval_every=4,
                           test_size=16, data_dir=str(DATA), options=options)  # fmt: skip
        tuner = make_tuner(method, client.model_info(), **options)
        return run_tuning(client, SST2, tuner, config, out_dir, **kwargs), tuner


def test_prompt_tuning_runs_locally_and_is_tested_through_the_api(live_server, tiny_model_dirs, tmp_path):
    options = {"local_model": str(tiny_model_dirs["llama"]), "epochs": 3, "prompt_length": 4, "seed": 13}
    with live_server("llama", budget=1000) as server:
        result, tuner = run_method(server.url, "prompt-tuning", 50, options, tmp_path, placement="prefix")
        charged = server.server.config.app.state.budget.used
    # manual prompt, its calibration on train, the tuned prompt
    assert result.calls_used == 0 and result.eval_calls == 3 == charged
    assert result.test_acc is not None and result.status == "completed"
    candidate, meta = load_prompt(tmp_path / "prompt.npz")
    assert candidate.token_ids is None and candidate.soft.shape == (4, 32)
    np.testing.assert_array_equal(candidate.soft, tuner.best.soft)
    assert meta["method"] == "prompt-tuning" and meta["local_model"] == "llama"


def test_prompt_tuning_refuses_a_local_model_that_is_not_the_served_one(live_server, tiny_model_dirs):
    options = {"local_model": str(tiny_model_dirs["llama"]), "epochs": 1}
    with live_server("gpt2") as server, pytest.raises(LocalModelError, match="not the served model"):
        run_method(server.url, "prompt-tuning", 10, options)


# ----------------------------------------------------------------------------------------- GDFO


class InjectSpy:
    def __init__(self, monkeypatch):
        self.calls: list[tuple[np.ndarray, bool | None]] = []
        original = cma.CMAEvolutionStrategy.inject

        def inject(es, solutions, force=None):
            self.calls += [(np.array(s), force) for s in solutions]
            return original(es, solutions, force)

        monkeypatch.setattr(cma.CMAEvolutionStrategy, "inject", inject)


def test_gdfo_runs_end_to_end_and_injects_gradient_refined_points(live_server, tiny_model_dirs, tmp_path, monkeypatch):
    spy = InjectSpy(monkeypatch)
    options = {**GDFO_TINY, "student": str(tiny_model_dirs["gpt2"]), "seed": 13}  # a student unlike the teacher
    with live_server("llama", budget=1000) as server:
        result, tuner = run_method(server.url, "gdfo", 14, options, tmp_path)
        charged = server.server.config.app.state.budget.used
    assert "gdfo" in TUNERS and isinstance(tuner, GDFOTuner)
    assert result.calls_used == 14 and result.status == "completed"  # 3 full generations + 2 calls
    assert charged == result.calls_used + result.eval_calls
    assert [p["calls"] for p in result.curve] == [4, 8, 12, 14]
    assert tuner.generation == 3 and len(spy.calls) == 3 == len(tuner.injected)  # one per told generation
    for (injected, force), ours in zip(spy.calls, tuner.injected, strict=True):
        np.testing.assert_array_equal(injected, ours)
        assert force is False
    assert [h.get("injected_rank") is not None for h in tuner.history] == [False, True, True]
    assert all(h["step_norm"] > 0 and np.isfinite(h["kl_last"]) for h in tuner.history)
    candidate, _ = load_prompt(tmp_path / "prompt.npz")
    assert candidate.soft.shape == (3, 32) and candidate.token_ids is not None


def fake_teacher(tuner: GDFOTuner, candidates, seed: int = 0):
    """Deterministic teacher logits [N, 2] and CE losses from each candidate's z."""
    matrix = np.random.default_rng(seed).normal(0, 1, (tuner.config.intrinsic_dim, len(TRAIN) * 2))
    labels = np.array([e.label for e in TRAIN])
    logits = [(np.asarray(c.z) @ matrix).reshape(len(TRAIN), 2).astype(np.float32) for c in candidates]
    losses = []
    for row in logits:
        shifted = row - row.max(1, keepdims=True)
        losses.append(
            float(-(shifted - np.log(np.exp(shifted).sum(1, keepdims=True)))[np.arange(len(labels)), labels].mean())
        )
    return losses, logits


def generations(tuner: GDFOTuner, count: int) -> list[np.ndarray]:
    asked = []
    for _ in range(count):
        candidates = tuner.ask()
        losses, logits = fake_teacher(tuner, candidates)
        tuner.observe(candidates, losses)
        tuner.tell(losses, logits)
        asked.append(np.stack([c.z for c in candidates]))
    return asked


def gdfo(local_models, **options) -> GDFOTuner:
    student = local_models("llama")
    tuner = make_tuner("gdfo", model_info(), **{**GDFO_TINY, "seed": 5, **options})
    assert isinstance(tuner, GDFOTuner)
    tuner.attach(student, SST2, TRAIN, "suffix")
    return tuner


def model_info():
    from tests.client.test_tuners_bbt import fake_model

    return fake_model(vocab_size=400, hidden_size=32, embedding_std=0.02).model_copy(update={"family": "causal"})


def test_forced_injection_is_the_first_candidate_of_the_next_generation(local_models):
    tuner = gdfo(local_models, inject_force=True)
    generations(tuner, 1)
    asked = tuner.ask()
    np.testing.assert_allclose(asked[0].z, tuner.injected[-1], rtol=1e-12, atol=1e-15)  # pycma's float round trip
    assert len(asked) == 4


def test_gdfo_distillation_moves_the_student_towards_the_teacher(local_models):
    tuner = gdfo(local_models, distill_steps=25, z_steps=0, buffer_generations=1)
    generations(tuner, 1)
    record = tuner.history[0]
    assert record["kl_last"] < record["kl_first"]
    assert float(tuner.params["u"].detach().abs().sum()) > 0  # the projection's correction left zero


def test_gdfo_resumes_bit_identically(local_models):
    uninterrupted = gdfo(local_models, seed=9)
    generations(uninterrupted, 2)
    state = pickle.loads(pickle.dumps(uninterrupted.state_dict()))  # as the runner's checkpoint file
    expected = generations(uninterrupted, 3)

    np.random.standard_normal(7)  # other users of the global RNGs in between
    torch.randn(3)
    restored = make_tuner("gdfo", model_info(), **{**GDFO_TINY, "seed": 9})
    restored.load_state_dict(state)  # before the student is attached, as the runner does
    restored.attach(local_models("llama"), SST2, TRAIN, "suffix")
    observed = generations(restored, 3)
    for a, b in zip(expected, observed, strict=True):
        np.testing.assert_array_equal(a, b)
    for key in uninterrupted.params:
        torch.testing.assert_close(uninterrupted.params[key], restored.params[key], atol=0, rtol=0)
    np.testing.assert_array_equal(np.stack(uninterrupted.injected), np.stack(restored.injected))
    assert restored.best_loss == uninterrupted.best_loss
    assert json.dumps(restored.history) == json.dumps(uninterrupted.history[:2] + restored.history[2:])


def test_gdfo_tell_needs_the_teacher_logits_and_a_student(local_models):
    tuner = make_tuner("gdfo", model_info(), **GDFO_TINY)
    candidates = tuner.ask()
    losses, logits = fake_teacher(tuner, candidates)
    with pytest.raises(RuntimeError, match="student"):
        tuner.tell(losses, logits)
    tuner.attach(local_models("llama"), SST2, TRAIN, "suffix")
    with pytest.raises(ValueError, match="logits"):
        tuner.tell(losses)
    tuner.tell(losses, logits)


def test_a_resumed_gdfo_run_ends_like_an_uninterrupted_one(live_server, tiny_model_dirs, tmp_path):
    options = {**GDFO_TINY, "student": str(tiny_model_dirs["llama"]), "seed": 13}

    with live_server("llama", budget=10_000) as server:
        straight, _ = run_method(server.url, "gdfo", 12, options, tmp_path / "straight")
        with pytest.raises(Crash):
            run_method(server.url, "gdfo", 12, options, tmp_path / "resumed", on_progress=crash_after(8))
    with live_server("llama", budget=10_000) as server:
        resumed, _ = run_method(server.url, "gdfo", 12, options, tmp_path / "resumed", resume=True)
    assert resumed.calls_used == straight.calls_used == 12
    assert resumed.curve == straight.curve and resumed.test_acc == straight.test_acc
    with np.load(tmp_path / "straight" / "prompt.npz") as a, np.load(tmp_path / "resumed" / "prompt.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------------------- no torch on import


def test_importing_the_client_and_its_tuners_loads_no_torch():
    code = (
        "import sys, lmaas_client, lmaas_client.tuners, lmaas_client.run, lmaas_client.local_model\n"
        "from lmaas_client.tuners import TUNERS\n"
        "assert {'gdfo', 'prompt-tuning'} <= set(TUNERS), TUNERS\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(REPO), timeout=120
    )
    assert completed.returncode == 0, completed.stderr
