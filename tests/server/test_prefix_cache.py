"""The prefix cache of causal LMs: text keys/values computed once and reused must give the plain path's logits
for every prompt form, with projections, truncation, handles and small batches; when it is (not) taken."""

from __future__ import annotations

import numpy as np
import pytest

import lmaas_server.engine.engine as engine_module
from lmaas_protocol import (
    Candidate,
    EvaluateRequest,
    Example,
    InputsSpec,
    Projected,
)
from lmaas_server.metering.budget import CallBudget
from tests.server.forms_support import (
    ATOL,
    SUFFIX,
    TEMPLATES,
    TEXTS,
    empty,
    evaluate,
    mixed_population,
    normal,
    offset_candidate,
    references,
    spec,
    t,
    verbalizer,
)
from tests.support.tiny_models import CAUSAL_KINDS, HIDDEN, MASKED_KINDS


@pytest.fixture
def forward_log(monkeypatch):
    """Factory: record (rows, took the cached path?) of every forward batch of an engine."""

    def attach(engine) -> list[tuple[int, bool]]:
        log: list[tuple[int, bool]] = []
        original = engine.forward.run

        def run(batch):
            log.append((len(batch), batch[0].prefix is not None))
            assert all((row.prefix is not None) == log[-1][1] for row in batch)  # one path per batch
            return original(batch)

        monkeypatch.setattr(engine.forward, "run", run)
        return log

    return attach


@pytest.fixture
def prefix_spy(monkeypatch):
    """Counts prefix computations (the engine module's own reference to compute_prefix)."""
    calls: list[int] = []
    original = engine_module.compute_prefix

    def spy(model, examples, *args, **kwargs):
        calls.append(len(examples))
        return original(model, examples, *args, **kwargs)

    monkeypatch.setattr(engine_module, "compute_prefix", spy)
    return calls


# ----------------------------------------------------------------------------------------------- the prefix cache


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefix_cache_is_on_for_causal_models_and_off_when_disabled(engines, kind):
    assert engines(kind).prefix_cache is True
    assert engines(kind, prefix_cache=False).prefix_cache is False
    for masked in MASKED_KINDS:
        assert engines(masked).prefix_cache is False


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefix_cache_gives_the_plain_paths_logits_for_every_prompt_form(engines, kind, prefix_spy, forward_log):
    cached, plain = engines(kind), engines(kind, prefix_cache=False)
    prefix_spy.clear()  # building an engine runs the start-up probe of the cache
    log = forward_log(cached)
    population = mixed_population(30)
    got = evaluate(cached, population, "causal_suffix")
    assert prefix_spy == [len(TEXTS)]  # the text before {prompt} ran once, for all candidates
    assert (len(TEXTS), False) in log  # the offset's rows: plain path
    assert sum(rows for rows, on_cache in log if on_cache) == (len(population) - 1) * len(TEXTS)
    want = evaluate(plain, population, "causal_suffix")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # and each candidate against a hand-built forward
    np.testing.assert_allclose(got[0], references(cached, "causal_suffix", empty(cached)), atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        got[1], references(cached, "causal_suffix", population[1].soft_prompt.to_numpy()), atol=ATOL, rtol=0
    )
    deep = population[3].deep_prompt
    np.testing.assert_allclose(
        got[3],
        references(cached, "causal_suffix", deep[0].to_numpy(), {1: deep[1].to_numpy()}),
        atol=ATOL,
        rtol=1e-4,
    )


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefix_cache_matches_with_projections_and_small_batches(engines, kind, prefix_spy, forward_log):
    cached, plain = engines(kind, max_batch_tokens=64), engines(kind, prefix_cache=False)
    prefix_spy.clear()  # building an engine runs the start-up probe of the cache
    log = forward_log(cached)
    projections = {"p": spec(5, 40, [5, HIDDEN], scale=0.1)}
    population = [Candidate(soft_prompt=Projected(z=t(normal(s, 40)), projection="p")) for s in range(3)] + [
        Candidate(deep_prompt=[None, Projected(z=t(normal(9, 40)), projection="p")])
    ]
    texts = TEXTS * 2
    got = evaluate(cached, population, "causal_suffix", texts=texts, projections=projections)
    want = evaluate(plain, population, "causal_suffix", texts=texts, projections=projections)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert prefix_spy == [len(texts)]
    assert len(log) > 3 and all(on_cache for _, on_cache in log)  # many small cached batches


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefix_cache_with_truncated_examples(engines, kind):
    cached, plain = engines(kind, max_seq_len=24), engines(kind, max_seq_len=24, prefix_cache=False)
    texts = ["fun", " ".join(["the movie was great and fun to watch"] * 6), "a bad film , boring and dull ."]
    population = [Candidate(), Candidate(soft_prompt=t(normal(1, 4, HIDDEN))), Candidate(prompt_token_ids=[5])]
    got = evaluate(cached, population, "causal_suffix", texts=texts, truncate=True)
    want = evaluate(plain, population, "causal_suffix", texts=texts, truncate=True)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_a_registered_handle_takes_the_cached_path_even_for_one_candidate(engines, kind, prefix_spy, forward_log):
    cached, plain = engines(kind), engines(kind, prefix_cache=False)
    prefix_spy.clear()  # building an engine runs the start-up probe of the cache
    log = forward_log(cached)
    spec_ = InputsSpec(
        template=SUFFIX, examples=[Example(text_a=text) for text in TEXTS], verbalizer=verbalizer(cached)
    )
    registered = cached.register_inputs(spec_)
    assert registered.prefix_cache is True
    prepared = cached.inputs.get(registered.handle)
    assert all(v.prefix is None for v in prepared.variants.values())  # nothing computed at registration
    one = [Candidate(soft_prompt=t(normal(40, 3, HIDDEN)))]
    first = cached.evaluate(EvaluateRequest(inputs=registered.handle, candidates=one), CallBudget(None))
    assert prefix_spy == [len(TEXTS)] and log == [(len(TEXTS), True)]
    assert prepared.variants[(3, 3)].prefix is not None
    again = cached.evaluate(EvaluateRequest(inputs=registered.handle, candidates=one), CallBudget(None))
    assert prefix_spy == [len(TEXTS)]  # reused, not recomputed
    got = np.stack([r.logits.to_numpy() for r in first.results])
    np.testing.assert_array_equal(got, np.stack([r.logits.to_numpy() for r in again.results]))
    want = evaluate(plain, one, "causal_suffix")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # another prompt length renders the same text: the variant shares the cache
    other = cached.evaluate(
        EvaluateRequest(inputs=registered.handle, candidates=[Candidate(prompt_token_ids=[5])]), CallBudget(None)
    )
    assert prefix_spy == [len(TEXTS)]
    np.testing.assert_allclose(
        other.results[0].logits.to_numpy(),
        evaluate(plain, [Candidate(prompt_token_ids=[5])], "causal_suffix")[0],
        atol=ATOL,
    )
    cached.inputs.delete(registered.handle)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_a_text_cache_larger_than_the_input_cache_is_never_computed(engines, kind, prefix_spy, forward_log):
    small, plain = engines(kind, input_cache_bytes=4096), engines(kind, prefix_cache=False)
    prefix_spy.clear()
    log = forward_log(small)
    examples = [Example(text_a=text) for text in TEXTS]
    registered = small.register_inputs(InputsSpec(template=SUFFIX, examples=examples, verbalizer=verbalizer(small)))
    assert registered.prefix_cache is False and "more than the server's input cache" in registered.prefix_cache_reason
    population = [Candidate(soft_prompt=t(normal(s, 3, HIDDEN))) for s in (41, 42)]
    got = small.evaluate(EvaluateRequest(inputs=registered.handle, candidates=population), CallBudget(None))
    assert prefix_spy == [] and log and all(not on_cache for _, on_cache in log)  # the plain path instead
    np.testing.assert_allclose(
        np.stack([r.logits.to_numpy() for r in got.results]), evaluate(plain, population, "causal_suffix"), atol=ATOL
    )
    assert len(small.inputs) == 1  # the set itself stays registered
    small.inputs.delete(registered.handle)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_the_cached_path_needs_two_cacheable_candidates_inline(engines, kind, prefix_spy, forward_log):
    engine = engines(kind)
    prefix_spy.clear()  # building an engine runs the start-up probe of the cache
    log = forward_log(engine)
    evaluate(engine, [Candidate(soft_prompt=t(normal(1, 2, HIDDEN)))], "causal_suffix")
    offsets = [offset_candidate(normal(s, 4, 2), normal(s + 1, 2, HIDDEN), 0.5) for s in (1, 2)]
    evaluate(engine, [offsets[0], offsets[1], Candidate()], "causal_suffix")  # only one candidate could reuse it
    assert prefix_spy == [] and all(not on_cache for _, on_cache in log)
    evaluate(engine, [Candidate(), Candidate(prompt_token_ids=[5])], "causal_suffix")
    assert prefix_spy == [len(TEXTS)] and log[-1][1] is True


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefix_placement_never_computes_a_prefix(engines, kind, prefix_spy, forward_log):
    engine = engines(kind)
    prefix_spy.clear()  # building an engine runs the start-up probe of the cache
    log = forward_log(engine)
    population = mixed_population(50)[:-1]
    evaluate(engine, population, "causal_front")
    registered = engine.register_inputs(
        InputsSpec(
            template=TEMPLATES["causal_front"][0], examples=[Example(text_a="fun")], verbalizer=verbalizer(engine)
        )
    )
    assert registered.prefix_cache is False and "prefix placement" in registered.prefix_cache_reason
    engine.evaluate(EvaluateRequest(inputs=registered.handle, candidates=population), CallBudget(None))
    assert prefix_spy == [] and log and all(not on_cache for _, on_cache in log)
    engine.inputs.delete(registered.handle)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prompt_right_before_the_answer_cue_works_with_a_prompt(engines, kind):
    """Template "...Sentiment:{prompt}{mask}": nothing follows the slot; non-empty prompts still match."""
    cached, plain = engines(kind), engines(kind, prefix_cache=False)
    template = "Review: {text_a}\nSentiment:{prompt}{mask}"
    population = [Candidate(soft_prompt=t(normal(1, 3, HIDDEN))), Candidate(prompt_token_ids=[5, 6])]
    np.testing.assert_allclose(
        evaluate(cached, population, template), evaluate(plain, population, template), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_empty_prompt_right_before_the_answer_cue_matches_the_plain_path(engines, kind):
    cached, plain = engines(kind), engines(kind, prefix_cache=False)
    template = "Review: {text_a}\nSentiment:{prompt}{mask}"
    population = [Candidate(), Candidate(soft_prompt=t(normal(1, 3, HIDDEN)))]
    np.testing.assert_allclose(
        evaluate(cached, population, template), evaluate(plain, population, template), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_only_empty_prompts_right_before_the_answer_cue(engines, kind):
    cached, plain = engines(kind), engines(kind, prefix_cache=False)
    template = "Review: {text_a}\nSentiment:{prompt}{mask}"
    np.testing.assert_allclose(
        evaluate(cached, [Candidate(), Candidate()], template),
        evaluate(plain, [Candidate(), Candidate()], template),
        atol=ATOL,
    )
