"""BBTv2 generations through the engine: the layers below the tuned one run once per example, whether the
client sends z per layer (server-side projection) or full deep-prompt tensors, with the plain path's logits."""

from __future__ import annotations

import numpy as np
import pytest

import lmaas_runtime.deep_reuse as deep_reuse
from lmaas_protocol import Candidate, Projected
from tests.server.forms_support import ATOL, evaluate, normal, references, spec, t
from tests.support.tiny_models import HIDDEN

PROMPT = 4
CASES = [("llama", "causal_suffix"), ("llama", "causal_front"), ("gpt2", "causal_suffix"), ("bert", "masked_mid")]


@pytest.fixture
def plans(monkeypatch):
    chosen: list = []
    original = deep_reuse.plan_reuse

    def spy(batch, num_layers):
        chosen.append(original(batch, num_layers))
        return chosen[-1]

    monkeypatch.setattr(deep_reuse, "plan_reuse", spy)
    return chosen


def generation(count: int, projected: bool) -> tuple[list[Candidate], dict | None]:
    """Layer 0 fixed at its best z, layer 1 tuned (the tiny models have 2 layers): as BBTv2 sends them."""
    if projected:
        projections = {f"layer{i}": spec(i, 20, [PROMPT, HIDDEN], scale=0.5) for i in range(2)}
        best = normal(50, 20)
        return [
            Candidate(
                prompt_token_ids=[5, 6, 7, 8],
                deep_prompt=[
                    Projected(z=t(best), projection="layer0"),
                    Projected(z=t(normal(k, 20)), projection="layer1"),
                ],
            )
            for k in range(count)
        ], projections
    shared = normal(50, PROMPT, HIDDEN)
    return [Candidate(deep_prompt=[t(shared), t(normal(k, PROMPT, HIDDEN))]) for k in range(count)], None


def without_reuse(engine, *args, **kwargs) -> np.ndarray:
    reuse = engine.loaded.forward.layer_reuse
    reuse.enabled = False
    try:
        return evaluate(engine, *args, **kwargs)
    finally:
        reuse.enabled = True


@pytest.mark.parametrize(("kind", "template"), CASES)
@pytest.mark.parametrize("projected", [True, False])
def test_a_generation_reuses_the_shared_layer_and_matches_the_plain_path(engines, plans, kind, template, projected):
    engine = engines(kind)
    candidates, projections = generation(6, projected)
    got = evaluate(engine, candidates, template, projections=projections)
    chosen = [plan for plan in plans if plan is not None]
    assert chosen and all(plan.layer == 1 for plan in chosen)
    assert sum(len(plan.base_of) for plan in chosen) == got.shape[0] * got.shape[1]  # every row reused layer 0
    np.testing.assert_allclose(got, without_reuse(engine, candidates, template, projections=projections), atol=ATOL)
    if not projected:  # and against a forward built by hand, for two candidates
        for k in (0, 5):
            deep = candidates[k].deep_prompt
            want = references(engine, template, deep[0].to_numpy(), {1: deep[1].to_numpy()})
            np.testing.assert_allclose(got[k], want, atol=1e-5, rtol=1e-4)
    assert np.abs(got[0] - got[5]).max() > 1e-5  # the tuned layer matters


def test_a_generation_tuning_the_embedding_level_shares_nothing(engines, plans):
    engine = engines("llama")
    candidates = [
        Candidate(deep_prompt=[t(normal(k, PROMPT, HIDDEN)), t(normal(50, PROMPT, HIDDEN))]) for k in range(6)
    ]
    got = evaluate(engine, candidates, "causal_suffix")
    assert plans and all(plan is None for plan in plans)
    np.testing.assert_allclose(got, without_reuse(engine, candidates, "causal_suffix"), atol=ATOL)
