"""`FrozenLM`: the client's differentiable path and the server's batched path are one forward pass."""

from __future__ import annotations

import pytest

from lmaas_protocol import Example
from tests.support.tiny_models import CAUSAL_KINDS, HIDDEN, KINDS

torch = pytest.importorskip("torch")
from lmaas_runtime import FrozenLM, ModelError, RowPrompt  # noqa: E402

TEMPLATES = {
    "masked": "{prompt} . {text_a} . It was {mask} .",
    "causal": "Review: {text_a}\n{prompt}Sentiment:{mask}",  # text before the prompt: prefix-cacheable
}
EXAMPLES = [Example(text_a=t) for t in ("the movie was great", "a bad film , boring and dull .", "fun to watch")]


def _soft(length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_class_logits_equal_the_servers_batched_run(frozen, kind):
    lm = frozen(kind)
    rendered = lm.render(TEMPLATES[lm.family], EXAMPLES, 4)
    verbalizer = lm.label_ids(["great", "terrible"])
    soft = _soft(4, seed=1)
    served = lm.prompt_logits(rendered, verbalizer, [RowPrompt(4, soft=soft)])[0]  # [examples, classes]
    for cache_text in (False, True):
        with torch.no_grad():
            local = lm.class_logits(lm.prepare(rendered, cache_text), verbalizer, soft)
        assert (lm.prepare(rendered, cache_text).prefix is not None) == (cache_text and kind in CAUSAL_KINDS)
        torch.testing.assert_close(local, torch.from_numpy(served), atol=1e-4, rtol=0)


def test_gradients_reach_the_soft_prompt_through_the_prefix_cache(frozen):
    lm = frozen("llama")
    prepared = lm.prepare(lm.render(TEMPLATES["causal"], EXAMPLES, 3))
    assert prepared.prefix is not None
    soft = _soft(3, seed=2).requires_grad_(True)
    lm.class_logits(prepared, lm.label_ids(["great", "terrible"]), soft).logsumexp(dim=1).sum().backward()
    assert soft.grad is not None and float(soft.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in lm.model.parameters())  # frozen: only the prompt learns


def test_facts_and_errors(frozen):
    lm = frozen("gpt2")
    assert (lm.hidden_size, lm.num_layers, lm.max_length) == (HIDDEN, len(lm.layers), 128)
    assert lm.embedding_std > 0 and len(lm.layer_std(lm.render(TEMPLATES["causal"], EXAMPLES, 0))) == lm.num_layers
    with pytest.raises(ModelError, match="share their first token"):
        lm.label_ids(["great", "great"])
    with pytest.raises(ModelError, match="not found"):
        FrozenLM.load("/nonexistent/model.gguf")
