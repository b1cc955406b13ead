"""The engine on tiny masked and causal models: prompts matter, known prompts give known logits, and
batching, chunking and the add/replace semantics of prompts do not change results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmaas_protocol import Candidate, EvaluateRequest, Example, Tensor
from lmaas_server.errors import InvalidRequest
from lmaas_server.metering.budget import CallBudget
from tests.support.tiny_models import CAUSAL_KINDS, KINDS, MASKED_KINDS

TEMPLATES = {"masked": "{prompt} . {text_a} . It was {mask} .", "causal": "{prompt}Review: {text_a}\nSentiment:{mask}"}
TEXTS = ["the movie was great", "a bad film , boring and dull .", "it was terrible", "fun to watch", "thin plot"]


def verbalizer(engine):
    words = [" bad", " great"] if engine.causal else ["bad", "great"]
    return [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in words]


def request(engine, candidates, texts=TEXTS, labels=True, template=None, **extra):
    examples = [Example(text_a=t, label=i % 2 if labels else None) for i, t in enumerate(texts)]
    return EvaluateRequest(
        template=template or TEMPLATES[engine.loaded.family],
        examples=examples,
        verbalizer=verbalizer(engine),
        candidates=candidates,
        **extra,
    )


def soft(engine, length, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    values = rng.normal(0, scale, (length, engine.info.hidden_size)).astype(np.float32)
    return Candidate(soft_prompt=Tensor.from_numpy(values))


def logits_of(response):
    return np.stack([r.logits.to_numpy() for r in response.results])  # [candidates, examples, classes]


def reference_logits(engine, text: str, prompt: np.ndarray) -> np.ndarray:
    """Direct HF forward with hand-built inputs: the prompt embeddings inserted where {prompt} is."""
    tok, model = engine.loaded.tokenizer, engine.loaded.model
    words = verbalizer(engine)
    if engine.causal:
        ids = tok(f"Review: {text}\nSentiment:", add_special_tokens=False)["input_ids"]
        pieces = [[], ids]
        label_at = len(prompt) + len(ids) - 1
    else:
        before = [tok.cls_token_id] if tok.cls_token_id is not None else [tok.bos_token_id]
        middle = tok(f" . {text} . It was", add_special_tokens=False)["input_ids"] + [tok.mask_token_id]
        after = tok(" .", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        pieces = [before, middle + after]
        label_at = len(before) + len(prompt) + len(middle) - 1
    emb = model.get_input_embeddings()
    with torch.no_grad():
        parts = [
            emb(torch.tensor(pieces[0], dtype=torch.long)),
            torch.from_numpy(prompt.copy()),
            emb(torch.tensor(pieces[1])),
        ]
        embeds = torch.cat(parts).unsqueeze(0)
        logits = model(inputs_embeds=embeds).logits[0, label_at]
    return np.array([logits[w[0]].item() for w in words])


@pytest.mark.parametrize("kind", KINDS)
def test_soft_prompt_changes_logits_and_reproduces_a_direct_forward(engines, kind):
    engine = engines(kind)
    candidate = soft(engine, 4, seed=1)
    response = engine.evaluate(request(engine, [Candidate(), candidate]), CallBudget(None))
    none, prompted = logits_of(response)
    assert np.abs(none - prompted).max() > 1e-3  # the prompt is not ignored
    expected = np.stack([reference_logits(engine, t, candidate.soft_prompt.to_numpy()) for t in TEXTS])
    np.testing.assert_allclose(prompted, expected, atol=1e-4, rtol=1e-4)
    expected_none = np.stack(
        [reference_logits(engine, t, np.zeros((0, engine.info.hidden_size), np.float32)) for t in TEXTS]
    )
    np.testing.assert_allclose(none, expected_none, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_population_batching_and_chunking_match_one_by_one(engines, kind):
    engine = engines(kind)
    chunked = engines(kind, max_batch_tokens=64)  # forces many small forward passes
    candidates = [soft(engine, length, seed) for seed, length in enumerate((2, 4, 4))]
    together = logits_of(engine.evaluate(request(engine, candidates), CallBudget(None)))
    split = logits_of(chunked.evaluate(request(chunked, candidates), CallBudget(None)))
    alone = np.concatenate([logits_of(engine.evaluate(request(engine, [c]), CallBudget(None))) for c in candidates])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(split, alone, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_soft_prompt_is_added_to_token_embeddings(engines, kind):
    engine = engines(kind)
    ids = [5, 6, 7]
    table = engine.loaded.model.get_input_embeddings().weight.detach().numpy()
    as_tokens = Candidate(prompt_token_ids=ids)
    as_vectors = Candidate(soft_prompt=Tensor.from_numpy(table[ids]))
    zero_added = Candidate(prompt_token_ids=ids, soft_prompt=Tensor.from_numpy(np.zeros_like(table[ids])))
    offset = np.random.default_rng(0).normal(0, 0.5, table[ids].shape).astype(np.float32)  # not constant: LayerNorm
    added = Candidate(prompt_token_ids=ids, soft_prompt=Tensor.from_numpy(offset))
    shifted = Candidate(soft_prompt=Tensor.from_numpy(table[ids] + offset))
    result = logits_of(
        engine.evaluate(request(engine, [as_tokens, as_vectors, zero_added, added, shifted]), CallBudget(None))
    )
    np.testing.assert_allclose(result[0], result[1], atol=1e-4)
    np.testing.assert_allclose(result[0], result[2], atol=1e-5)
    np.testing.assert_allclose(result[3], result[4], atol=1e-4)
    assert np.abs(result[0] - result[3]).max() > 1e-4


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_loss_and_accuracy_agree_with_the_logits(engines, kind):
    engine = engines(kind)
    response = engine.evaluate(request(engine, [soft(engine, 3, seed=7)]), CallBudget(None))
    logits = response.results[0].logits.to_numpy()
    labels = np.arange(len(TEXTS)) % 2
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert response.results[0].loss == pytest.approx(-log_probs[np.arange(len(labels)), labels].mean(), rel=1e-5)
    assert response.results[0].accuracy == pytest.approx((logits.argmax(1) == labels).mean())
    assert response.usage.calls == 1 and response.usage.examples == len(TEXTS)


def test_unlabelled_examples_give_logits_without_loss(engines):
    engine = engines("llama")
    response = engine.evaluate(request(engine, [Candidate()], labels=False), CallBudget(None))
    assert response.results[0].loss is None and response.results[0].accuracy is None
    assert response.results[0].logits.shape == [len(TEXTS), 2]


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_causal_lm_needs_the_mask_at_the_end(engines, kind):
    engine = engines(kind)
    with pytest.raises(InvalidRequest) as caught:
        engine.evaluate(request(engine, [Candidate()], template="{text_a} {mask} is the answer"), CallBudget(None))
    assert caught.value.param == "template"


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_over_long_examples_are_rejected_or_truncated(engines, kind):
    engine = engines(kind, max_seq_len=24)
    long_text = " ".join(["the movie was great and fun to watch"] * 10)
    budget = CallBudget(5)
    with pytest.raises(InvalidRequest) as caught:
        engine.evaluate(request(engine, [Candidate()], texts=["fun", long_text]), budget)
    assert caught.value.param == "examples.1"
    assert budget.used == 0
    response = engine.evaluate(request(engine, [soft(engine, 4, 0)], texts=["fun", long_text], truncate=True), budget)
    assert response.usage.tokens <= 2 * 24
    assert budget.used == 1


@pytest.mark.parametrize("kind", MASKED_KINDS)
def test_masked_lm_mask_may_sit_anywhere(engines, kind):
    engine = engines(kind)
    response = engine.evaluate(
        request(engine, [soft(engine, 2, 3)], template="{mask} : {text_a} {prompt}"), CallBudget(None)
    )
    assert np.isfinite(logits_of(response)).all()


def test_failed_forward_is_refunded(engines, monkeypatch):
    engine = engines("llama")
    budget = CallBudget(10)

    def explode(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.forward, "run", explode)
    with pytest.raises(RuntimeError):
        engine.evaluate(request(engine, [Candidate(), Candidate()]), budget)
    assert budget.used == 0
