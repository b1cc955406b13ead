"""Deep prompts that reuse the frozen layers: a population sharing its prompts below layer L gets the plain
path's logits, on every tested architecture, on the plain and the prefix-cached path."""

from __future__ import annotations

import numpy as np
import pytest

from lmaas_protocol import Example
from tests.support import tiny_models

torch = pytest.importorskip("torch")
import lmaas_runtime.deep_reuse as deep_reuse  # noqa: E402
from lmaas_runtime import FrozenLM, Row, RowPrompt, Verbalizer  # noqa: E402

LAYERS = 4  # room for a varying layer in the middle
PROMPT = 3
TEMPLATES = {
    "masked": "{prompt} . {text_a} . It was {mask} .",
    "causal": "Review: {text_a}\n{prompt}Sentiment:{mask}",  # text before the prompt: prefix-cacheable
}
EXAMPLES = [Example(text_a=t) for t in ("the movie was great", "a bad film , boring and dull .", "fun to watch")]


@pytest.fixture(scope="module")
def deep_lm():
    """`deep_lm(kind)`: a tiny model of that kind with 4 layers, as a FrozenLM (built once per module)."""
    cache: dict[str, FrozenLM] = {}

    def get(kind: str) -> FrozenLM:
        if kind not in cache:
            tokenizer = tiny_models.build_tokenizer(kind)
            layers, tiny_models.LAYERS = tiny_models.LAYERS, LAYERS
            try:
                model = tiny_models.build_model(kind, len(tokenizer), tokenizer.pad_token_id)
            finally:
                tiny_models.LAYERS = layers
            model.eval().requires_grad_(False)
            family = "masked" if kind in tiny_models.MASKED_KINDS else "causal"
            cache[kind] = FrozenLM(model, tokenizer, kind, family, max_length=128)
        return cache[kind]

    return get


@pytest.fixture
def plans(monkeypatch):
    """The plans the forward passes chose (None: plain path)."""
    chosen: list = []
    original = deep_reuse.plan_reuse

    def spy(batch, num_layers):
        chosen.append(original(batch, num_layers))
        return chosen[-1]

    monkeypatch.setattr(deep_reuse, "plan_reuse", spy)
    return chosen


def _values(seed: int) -> torch.Tensor:
    return torch.randn(PROMPT, tiny_models.HIDDEN, generator=torch.Generator().manual_seed(seed)) * 4.0


def population(tuned: int, count: int, share_objects: bool = True, token_ids: list[int] | None = None):
    """BBTv2's generation: every layer's prompt shared, layer `tuned` varying (layer 0: the embedding level)."""
    shared = {layer: _values(100 + layer) for layer in range(LAYERS)}
    prompts = []
    for k in range(count):
        values = {layer: v if share_objects else v.clone() for layer, v in shared.items()}
        values[tuned] = _values(k)
        deep = {layer: v for layer, v in values.items() if layer > 0}
        prompts.append(RowPrompt(PROMPT, token_ids, soft=values[0], deep=deep))
    return prompts


def score(lm: FrozenLM, prompts, cached: bool, reuse: bool = True) -> np.ndarray:
    """Every prompt on every example in one batch: class logits [prompts, examples, classes]."""
    rendered = lm.render(TEMPLATES[lm.family], EXAMPLES, PROMPT)
    prepared = lm.prepare(rendered, cache_text=cached)
    assert (prepared.prefix is not None) == cached
    verbalizer = Verbalizer.build(lm.label_ids(["great", "terrible"]), lm.device)
    out = np.zeros((len(prompts), len(rendered), 2), dtype=np.float32)
    rows = [
        Row(example, prompt, verbalizer, out[c, e], prepared.prefix, e)
        for c, prompt in enumerate(prompts)
        for e, example in enumerate(rendered)
    ]
    lm.forward.layer_reuse.enabled, enabled = reuse, lm.forward.layer_reuse.enabled
    try:
        lm.run(rows)
    finally:
        lm.forward.layer_reuse.enabled = enabled
    return out


def reference(lm: FrozenLM, prompts) -> np.ndarray:
    """One prompt per batch (nothing to share): the plain path."""
    rendered = lm.render(TEMPLATES[lm.family], EXAMPLES, PROMPT)
    return lm.prompt_logits(rendered, lm.label_ids(["great", "terrible"]), prompts)


@pytest.mark.parametrize("kind", tiny_models.KINDS)
@pytest.mark.parametrize("tuned", [1, 2, 3])
def test_shared_layers_run_once_and_give_the_plain_paths_logits(deep_lm, plans, kind, tuned):
    lm = deep_lm(kind)
    prompts = population(tuned, count=4)
    expected = reference(lm, prompts)
    for cached in (False, True) if lm.causal else (False,):
        plans.clear()
        got = score(lm, prompts, cached)
        assert plans[0] is not None and plans[0].layer == tuned  # layers < tuned ran once per example
        assert len(plans[0].bases) == len(EXAMPLES) and len(plans[0].base_of) == len(prompts) * len(EXAMPLES)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 1e-4  # the varying layer does change the logits


@pytest.mark.parametrize("cached", [False, True])
def test_equal_raw_tensors_are_shared_like_identical_ones(deep_lm, plans, cached):
    """A client sending full deep prompts (decoded into separate tensors) gets the reuse and the same logits."""
    lm = deep_lm("llama")
    prompts = population(2, count=3, share_objects=False, token_ids=[5, 6, 7])
    got = score(lm, prompts, cached)
    assert plans[0] is not None and plans[0].layer == 2
    np.testing.assert_allclose(got, score(lm, prompts, cached, reuse=False), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, reference(lm, prompts), atol=1e-5, rtol=0)


def test_mixed_generations_share_what_they_can(deep_lm, plans):
    """Two populations tuning different layers (two clients) in one batch: the lower layer bounds L."""
    lm = deep_lm("llama")
    prompts = population(3, count=4) + population(1, count=2)
    got = score(lm, prompts, cached=True)
    assert plans[0] is not None and plans[0].layer == 3  # the tuned-layer-1 rows form their own bases
    assert len(plans[0].bases) == len(EXAMPLES) * (1 + 2)
    np.testing.assert_allclose(got, reference(lm, prompts), atol=1e-5, rtol=0)


def test_nothing_shared_takes_the_plain_path(deep_lm, plans):
    lm = deep_lm("gpt2")
    embedding_level = population(0, count=4)  # the varying prompt is at the embeddings: nothing to share
    np.testing.assert_allclose(score(lm, embedding_level, cached=False), reference(lm, embedding_level), atol=1e-5)
    no_deep = [RowPrompt(PROMPT, soft=_values(k)) for k in range(4)]
    score(lm, no_deep, cached=True)
    assert plans and all(plan is None for plan in plans)
    # embedding offsets change the text itself: never planned
    offset = RowPrompt(PROMPT, soft=_values(1), deep={1: _values(2)}, offset=torch.zeros(2, tiny_models.HIDDEN))
    rendered = lm.render(TEMPLATES["causal"], EXAMPLES, PROMPT)
    assert deep_reuse.plan_reuse([Row(e, offset) for e in rendered] * 2, LAYERS) is None


def test_unsupported_architectures_take_the_plain_path(deep_lm):
    lm = deep_lm("llama")
    reuse = deep_reuse.LayerReuse(lm.model, lm.layers)
    assert reuse.enabled and reuse.attribute == "layers"
    lm.model.config.model_type, model_type = "some-new-model", lm.model.config.model_type
    try:
        assert not deep_reuse.LayerReuse(lm.model, lm.layers).enabled
    finally:
        lm.model.config.model_type = model_type
