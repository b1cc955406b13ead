"""Every prompt form on tiny masked and causal models, checked against direct Hugging Face forwards built by
hand (`forms_support.reference`): deep prompts (BBTv2), discrete prompts (BDPL), DePT embedding offsets,
server-side projections, and batching/chunking invariance."""

from __future__ import annotations

import numpy as np
import pytest

from lmaas_protocol import (
    Candidate,
    LowRankOffset,
    Projected,
    ProjectionSpec,
    Tensor,
    materialize,
    project,
)
from lmaas_server.errors import InvalidRequest
from lmaas_server.metering.budget import CallBudget
from tests.server.forms_support import (
    ATOL,
    KIND_TEMPLATES,
    TEXTS,
    assert_differs,
    empty,
    evaluate,
    mixed_population,
    normal,
    offset_candidate,
    references,
    request,
    spec,
    t,
    table,
)
from tests.support.tiny_models import HIDDEN, KINDS, LAYERS

# ----------------------------------------------------------------------------------------------- deep prompts


@pytest.mark.parametrize("kind", KINDS)
def test_deep_prompt_entries_and_their_equivalences(engines, kind):
    engine = engines(kind)
    template = "masked_front" if not engine.causal else "causal_front"
    x, y, z = normal(1, 3, HIDDEN), normal(2, 3, HIDDEN), normal(3, 3, HIDDEN, scale=0.5)
    ids = [5, 6, 7]
    candidates = [
        Candidate(prompt_token_ids=ids),  # 0
        Candidate(prompt_token_ids=ids, deep_prompt=[None, t(y)]),  # 1: layer 1 on top of the tokens
        Candidate(prompt_token_ids=ids, deep_prompt=[None, None]),  # 2: null entries add nothing
        Candidate(prompt_token_ids=ids, deep_prompt=[None]),  # 3
        Candidate(soft_prompt=t(x)),  # 4
        Candidate(deep_prompt=[t(x)]),  # 5: entry 0 is a soft prompt
        Candidate(deep_prompt=[t(x), None]),  # 6: missing or null trailing layers add nothing
        Candidate(soft_prompt=t(x), deep_prompt=[t(z)]),  # 7: both at the word-embedding level
        Candidate(soft_prompt=t(x + z)),  # 8
        Candidate(prompt_token_ids=ids, deep_prompt=[t(z)]),  # 9: entry 0 is added to the tokens
        Candidate(soft_prompt=t(table(engine)[ids] + z)),  # 10
        Candidate(soft_prompt=t(x), deep_prompt=[None, t(y)]),  # 11
        Candidate(deep_prompt=[t(x), t(y)]),  # 12
    ]
    out = evaluate(engine, candidates, template)
    assert_differs(out[1], out[0])  # the layer-1 prompt is not ignored
    np.testing.assert_allclose(out[2], out[0], atol=ATOL)
    np.testing.assert_allclose(out[3], out[0], atol=ATOL)
    np.testing.assert_allclose(out[5], out[4], atol=ATOL)
    np.testing.assert_allclose(out[6], out[4], atol=ATOL)
    np.testing.assert_allclose(out[7], out[8], atol=ATOL)
    np.testing.assert_allclose(out[9], out[10], atol=ATOL)
    np.testing.assert_allclose(out[11], out[12], atol=ATOL)
    assert_differs(out[11], out[4])


@pytest.mark.parametrize(("kind", "template"), KIND_TEMPLATES)
def test_deep_prompt_at_layer_1_reproduces_a_hooked_forward(engines, kind, template):
    engine = engines(kind)
    ids = [5, 6, 7]
    x, y, w = normal(4, 3, HIDDEN), normal(5, 3, HIDDEN), normal(6, 3, HIDDEN)
    candidates = [
        Candidate(prompt_token_ids=ids, deep_prompt=[None, t(y)]),
        Candidate(deep_prompt=[t(x), t(y)]),
        Candidate(deep_prompt=[None, t(w)]),  # no base at all: zero vectors at the prompt positions
        Candidate(prompt_token_ids=ids),
    ]
    out = evaluate(engine, candidates, template)  # causal_suffix: several candidates, so the cached path
    np.testing.assert_allclose(out[0], references(engine, template, table(engine)[ids], {1: y}), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[1], references(engine, template, x, {1: y}), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[2], references(engine, template, np.zeros_like(w), {1: w}), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[3], references(engine, template, table(engine)[ids]), atol=ATOL, rtol=0)
    # and alone (a single inline candidate takes the plain path)
    alone = evaluate(engine, candidates[:1], template)
    np.testing.assert_allclose(alone[0], out[0], atol=ATOL)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_deep_prompts_are_checked_against_the_model(engines, kind):
    engine = engines(kind)
    template = "masked_front" if not engine.causal else "causal_front"
    budget = CallBudget(10)
    cases = {
        "candidates.1.deep_prompt": Candidate(deep_prompt=[None] * LAYERS + [t(normal(0, 2, HIDDEN))]),
        "candidates.1.deep_prompt.1.shape": Candidate(deep_prompt=[None, t(normal(0, 2, HIDDEN + 1))]),
        "candidates.1.deep_prompt.0.shape": Candidate(deep_prompt=[t(normal(0, 2, HIDDEN // 2))]),
    }
    for param, candidate in cases.items():
        with pytest.raises(InvalidRequest) as caught:
            engine.evaluate(request(engine, [Candidate(), candidate], template), budget)
        assert caught.value.param == param
    assert budget.used == 0
    full = Candidate(deep_prompt=[t(normal(i, 2, HIDDEN)) for i in range(LAYERS)])  # one entry per layer is fine
    assert np.isfinite(evaluate(engine, [full], template)).all()


# ----------------------------------------------------------------------------------------------- discrete prompts


@pytest.mark.parametrize(("kind", "template"), KIND_TEMPLATES)
def test_discrete_prompts_reproduce_a_direct_forward_and_equal_their_embedding_rows(engines, kind, template):
    engine = engines(kind)
    ids_a, ids_b = [5, 6, 7], [9, 10]
    candidates = [
        Candidate(),
        Candidate(prompt_token_ids=ids_a),
        Candidate(prompt_token_ids=ids_b),
        Candidate(soft_prompt=t(table(engine)[ids_a])),
        Candidate(prompt_token_ids=[]),
    ]
    out = evaluate(engine, candidates, template)
    assert_differs(out[1], out[0])
    assert_differs(out[1], out[2])
    np.testing.assert_allclose(out[1], out[3], atol=ATOL)
    np.testing.assert_allclose(out[4], out[0], atol=ATOL)
    np.testing.assert_allclose(out[1], references(engine, template, table(engine)[ids_a]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[2], references(engine, template, table(engine)[ids_b]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[0], references(engine, template, empty(engine)), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kind", "template", "words"),
    [
        ("bert", "{prompt} . {text_a} . It was {mask} .", "great movie"),
        ("roberta", "{text_a} .{prompt} It was {mask} .", " the movie"),
        ("llama", "{prompt}Review: {text_a}\nSentiment:{mask}", "great movie\n"),
        ("gpt2", "Review: {text_a}\n{prompt}Sentiment:{mask}", "the movie\n"),
    ],
)
def test_discrete_prompt_equals_the_same_words_written_into_the_template(engines, kind, template, words):
    engine = engines(kind)
    tok = engine.loaded.tokenizer
    ids = tok(words, add_special_tokens=False)["input_ids"]
    written = template.replace("{prompt}", words)
    # precondition of the comparison: the tokenizer splits the written text at the slot's boundaries
    before, after = (piece.split("{mask}")[0].rstrip(" ") for piece in template.split("{prompt}"))

    def encode(piece: str, text: str) -> list[int]:
        return tok(piece.format(text_a=text), add_special_tokens=False)["input_ids"]

    for text in TEXTS:
        assert encode(before, text) + ids + encode(after, text) == encode(before + words + after, text), text
    prompted = evaluate(engine, [Candidate(prompt_token_ids=ids), Candidate(prompt_token_ids=ids)], template)
    manual = evaluate(engine, [Candidate()], written)
    np.testing.assert_allclose(prompted[0], manual[0], atol=ATOL)
    np.testing.assert_allclose(prompted[1], manual[0], atol=ATOL)


# ----------------------------------------------------------------------------------------------- DePT offsets


@pytest.mark.parametrize(("kind", "template"), KIND_TEMPLATES)
def test_embedding_offset_reproduces_a_direct_forward(engines, kind, template):
    engine = engines(kind)
    a, b, scale = normal(7, 40, 2), normal(8, 2, HIDDEN), 0.3  # 40 rows: more than any example has
    offset = scale * (a @ b)
    x = normal(9, 3, HIDDEN)
    candidates = [
        Candidate(),
        offset_candidate(a, b, scale),  # an offset alone: the empty prompt slot
        offset_candidate(a, b, scale, soft_prompt=t(x)),
        offset_candidate(a, b, scale, prompt_token_ids=[5, 6]),
        Candidate(soft_prompt=t(x)),
    ]
    out = evaluate(engine, candidates, template)
    assert_differs(out[1], out[0])
    assert_differs(out[2], out[4])
    np.testing.assert_allclose(out[1], references(engine, template, empty(engine), offset=offset), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[2], references(engine, template, x, offset=offset), atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        out[3], references(engine, template, table(engine)[[5, 6]], offset=offset), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    ("kind", "template"),
    [("bert", "masked_mid"), ("roberta", "masked_front"), ("llama", "causal_suffix"), ("gpt2", "causal_front")],
)
def test_a_short_offset_touches_only_the_first_rows(engines, kind, template):
    engine = engines(kind)
    s = 2
    a, b, scale = normal(10, s, 3), normal(11, 3, HIDDEN), 1.5
    padded_a = np.concatenate([a, np.zeros((30, 3), np.float32)])
    x = normal(12, 2, HIDDEN)
    out = evaluate(
        engine,
        [
            offset_candidate(a, b, scale, soft_prompt=t(x)),
            offset_candidate(padded_a, b, scale, soft_prompt=t(x)),
            Candidate(soft_prompt=t(x)),
            offset_candidate(np.zeros_like(padded_a), b, scale, soft_prompt=t(x)),
        ],
        template,
    )
    np.testing.assert_allclose(out[0], out[1], atol=ATOL)
    np.testing.assert_allclose(out[3], out[2], atol=ATOL)
    assert_differs(out[0], out[2])
    full = np.zeros((64, HIDDEN), np.float32)
    full[:s] = scale * (a @ b)
    np.testing.assert_allclose(out[0], references(engine, template, x, offset=full), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_embedding_offsets_are_checked_against_the_model(engines, kind):
    engine = engines(kind, max_seq_len=48)
    template = "masked_front" if not engine.causal else "causal_front"
    budget = CallBudget(10)
    cases = {
        "candidates.0.embedding_offset.b.shape": offset_candidate(normal(0, 4, 2), normal(0, 2, HIDDEN - 1), 1.0),
        "candidates.0.embedding_offset.a.shape": offset_candidate(normal(0, 49, 2), normal(0, 2, HIDDEN), 1.0),
    }
    for param, candidate in cases.items():
        with pytest.raises(InvalidRequest) as caught:
            engine.evaluate(request(engine, [candidate], template), budget)
        assert caught.value.param == param
    assert budget.used == 0
    no_slot = "{text_a} . It was {mask} ." if not engine.causal else "Review: {text_a}\nSentiment:{mask}"
    with pytest.raises(Exception) as caught:  # rejected by the request itself (no {prompt} slot)
        request(engine, [offset_candidate(normal(0, 4, 2), normal(0, 2, HIDDEN), 1.0)], no_slot)
    assert "no {prompt} slot" in str(caught.value)


# ----------------------------------------------------------------------------------------------- server-side projection


def projected_raw(z: np.ndarray, projection: ProjectionSpec) -> np.ndarray:
    return project(z, materialize(projection), projection)


@pytest.mark.parametrize(
    ("kind", "template"),
    [("bert", "masked_front"), ("roberta", "masked_mid"), ("llama", "causal_front"), ("gpt2", "causal_suffix")],
)
def test_server_side_projection_equals_sending_the_projected_tensor(engines, kind, template):
    engine = engines(kind)
    soft_spec = spec(1, 50, [4, HIDDEN], scale=0.1)
    deep_spec = spec(2, 30, [4, HIDDEN], scale=0.2, distribution="uniform")
    a_spec, b_spec = spec(3, 20, [12, 2], scale=0.3), spec(4, 10, [2, HIDDEN], scale=0.5)
    z_soft, z_deep = normal(20, 50), normal(21, 30)
    z_a, z_b = normal(22, 20), normal(23, 10)
    projections = {"soft": soft_spec, "deep": deep_spec, "a": a_spec, "b": b_spec}

    def form(named: bool, z: np.ndarray, name: str, dtype: str = "float32") -> Projected:
        return Projected(z=Tensor.from_numpy(z, dtype=dtype), projection=name if named else projections[name])

    def candidates(named: bool) -> list[Candidate]:
        return [
            Candidate(soft_prompt=form(named, z_soft, "soft")),
            Candidate(prompt_token_ids=[5, 6, 7, 8], deep_prompt=[None, form(named, z_deep, "deep")]),
            Candidate(
                soft_prompt=form(named, z_soft, "soft"),
                embedding_offset=LowRankOffset(a=form(named, z_a, "a"), b=form(named, z_b, "b"), scale=0.8),
            ),
            Candidate(deep_prompt=[form(named, z_soft, "soft"), form(named, z_deep, "deep")]),
        ]

    raw_soft, raw_deep = projected_raw(z_soft, soft_spec), projected_raw(z_deep, deep_spec)
    raw = [
        Candidate(soft_prompt=t(raw_soft)),
        Candidate(prompt_token_ids=[5, 6, 7, 8], deep_prompt=[None, t(raw_deep)]),
        Candidate(
            soft_prompt=t(raw_soft),
            embedding_offset=LowRankOffset(a=t(projected_raw(z_a, a_spec)), b=t(projected_raw(z_b, b_spec)), scale=0.8),
        ),
        Candidate(deep_prompt=[t(raw_soft), t(raw_deep)]),
    ]
    expected = evaluate(engine, raw, template)
    named = evaluate(engine, candidates(True), template, projections=projections)
    inline = evaluate(engine, candidates(False), template)
    np.testing.assert_allclose(named, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(inline, named, atol=ATOL)
    assert_differs(named[0], named[2])  # the projected offset was used
    # float16 z: the projection of the float16 values
    half = Candidate(soft_prompt=Projected(z=Tensor.from_numpy(z_soft, dtype="float16"), projection="soft"))
    z16 = z_soft.astype(np.float16).astype(np.float32)
    got = evaluate(engine, [half], template, projections=projections)
    want = evaluate(engine, [Candidate(soft_prompt=t(projected_raw(z16, soft_spec)))], template)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_projection_limits_are_enforced_before_any_compute(engines):
    engine = engines("llama", max_projection_elements=1000)
    budget = CallBudget(5)
    big = spec(1, 50, [2, HIDDEN])  # 3200 elements
    small = spec(1, 10, [2, HIDDEN])  # 640 elements
    with pytest.raises(InvalidRequest) as caught:
        engine.evaluate(
            request(
                engine,
                [Candidate(soft_prompt=Projected(z=t(normal(0, 50)), projection="p"))],
                "causal_front",
                projections={"p": big},
            ),
            budget,
        )
    assert caught.value.param == "candidates.0.soft_prompt.projection"
    with pytest.raises(InvalidRequest) as caught:
        engine.evaluate(
            request(
                engine,
                [Candidate(soft_prompt=Projected(z=t(normal(0, 10)), projection=spec(1, 10, [2, HIDDEN + 1])))],
                "causal_front",
            ),
            budget,
        )
    assert caught.value.param == "candidates.0.soft_prompt.shape"
    assert budget.used == 0
    ok = engine.evaluate(
        request(engine, [Candidate(soft_prompt=Projected(z=t(normal(0, 10)), projection=small))], "causal_front"),
        budget,
    )
    assert budget.used == 1 and np.isfinite(ok.results[0].logits.to_numpy()).all()


# ----------------------------------------------------------------------------------------------- batching invariance


@pytest.mark.parametrize(
    ("kind", "template"),
    [("bert", "masked_mid"), ("roberta", "masked_front"), ("llama", "causal_suffix"), ("gpt2", "causal_suffix")],
)
def test_population_batching_and_chunking_do_not_change_any_prompt_form(engines, kind, template):
    engine, chunked = engines(kind), engines(kind, max_batch_tokens=64)
    projections = {"p": spec(7, 16, [3, HIDDEN], scale=0.1)}
    population = [
        *mixed_population(60),
        Candidate(soft_prompt=Projected(z=t(normal(61, 16)), projection="p")),
        Candidate(deep_prompt=[None, Projected(z=t(normal(62, 16)), projection="p")]),
        offset_candidate(normal(63, 3, 2), normal(64, 2, HIDDEN), 2.0),
    ]
    together = evaluate(engine, population, template, projections=projections)
    split = evaluate(chunked, population, template, projections=projections)
    alone = np.concatenate([evaluate(engine, [c], template, projections=projections) for c in population])
    np.testing.assert_allclose(together, alone, atol=ATOL, rtol=0)
    np.testing.assert_allclose(split, alone, atol=ATOL, rtol=0)
    assert chunked.scheduler.batch_sizes and max(chunked.scheduler.batch_sizes) < len(population) * len(TEXTS)
