"""Every prompt form on tiny masked and causal models, checked against direct Hugging Face forwards built by
hand in this file: deep prompts (BBTv2), discrete prompts (BDPL), DePT embedding offsets, server-side
projections, and the prefix cache of causal LMs (which must give the plain path's logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmaas_server.engine as engine_module
from lmaas_protocol import (
    Candidate,
    EvaluateRequest,
    Example,
    InputsSpec,
    LowRankOffset,
    Projected,
    ProjectionSpec,
    Tensor,
    materialize,
    project,
)
from lmaas_server.budget import CallBudget
from lmaas_server.errors import InvalidRequest
from lmaas_server.model_loading import transformer_layers
from tests.support.tiny_models import CAUSAL_KINDS, HIDDEN, KINDS, LAYERS, MASKED_KINDS

TEXTS = ["the movie was great", "a bad film , boring and dull .", "it was terrible", "fun to watch", "thin plot"]

# name -> (template, family, the example's own ids before and after the prompt slot, built from the tokenizer
# alone: (ids of a string, the tokenizer, the text) -> (before, after)). Masked LMs: [CLS]/<s> ... [SEP]/</s>.
TEMPLATES = {
    "masked_front": (
        "{prompt} . {text_a} . It was {mask} .",
        "masked",
        lambda ids, tok, x: (
            [tok.cls_token_id],
            [*ids(f" . {x} . It was"), tok.mask_token_id, *ids(" ."), tok.sep_token_id],
        ),
    ),
    "masked_mid": (
        "{text_a} . {prompt} It was {mask} .",
        "masked",
        lambda ids, tok, x: (
            [tok.cls_token_id, *ids(f"{x} . ")],
            [*ids(" It was"), tok.mask_token_id, *ids(" ."), tok.sep_token_id],
        ),
    ),
    "masked_back": (  # the mask before the prompt
        "{mask} : {text_a} {prompt}",
        "masked",
        lambda ids, tok, x: ([tok.cls_token_id, tok.mask_token_id, *ids(f" : {x} ")], [tok.sep_token_id]),
    ),
    "causal_front": (
        "{prompt}Review: {text_a}\nSentiment:{mask}",
        "causal",
        lambda ids, tok, x: ([], ids(f"Review: {x}\nSentiment:")),
    ),
    "causal_suffix": (
        "Review: {text_a}\n{prompt}Sentiment:{mask}",
        "causal",
        lambda ids, tok, x: (ids(f"Review: {x}\n"), ids("Sentiment:")),
    ),
}
MASKED_TEMPLATES = ["masked_front", "masked_mid", "masked_back"]
CAUSAL_TEMPLATES = ["causal_front", "causal_suffix"]
KIND_TEMPLATES = [(k, t) for k in MASKED_KINDS for t in MASKED_TEMPLATES] + [
    (k, t) for k in CAUSAL_KINDS for t in CAUSAL_TEMPLATES
]
SUFFIX = TEMPLATES["causal_suffix"][0]
# Logits of these random tiny models are ~0.1 and the server reproduces hand-built forwards to ~1e-7; a
# misplaced deep prompt changes BERT's logits by only ~5e-6, so comparisons must be this tight to see it.
ATOL = 1e-6


# ----------------------------------------------------------------------------------------------- helpers


def verbalizer(engine) -> list[list[int]]:
    words = [" bad", " great"] if engine.causal else ["bad", "great"]
    return [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in words]


def request(engine, candidates, template: str, texts=TEXTS, **extra) -> EvaluateRequest:
    return EvaluateRequest(
        template=TEMPLATES[template][0] if template in TEMPLATES else template,
        examples=[Example(text_a=t, label=i % 2) for i, t in enumerate(texts)],
        verbalizer=verbalizer(engine),
        candidates=candidates,
        **extra,
    )


def evaluate(engine, candidates, template: str, **extra) -> np.ndarray:
    """[candidates, examples, classes]"""
    response = engine.evaluate(request(engine, candidates, template, **extra), CallBudget(None))
    return np.stack([r.logits.to_numpy() for r in response.results])


def normal(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def t(array: np.ndarray) -> Tensor:
    return Tensor.from_numpy(array)


def table(engine) -> np.ndarray:
    return engine.loaded.model.get_input_embeddings().weight.detach().numpy()


def offset_candidate(a: np.ndarray, b: np.ndarray, scale: float, **fields) -> Candidate:
    return Candidate(embedding_offset=LowRankOffset(a=t(a), b=t(b), scale=scale), **fields)


def example_pieces(engine, template: str, text: str) -> tuple[list[int], list[int]]:
    """Token ids of the example before and after the prompt slot, built from the tokenizer alone."""
    tok = engine.loaded.tokenizer
    _, family, build = TEMPLATES[template]
    assert family == engine.loaded.family

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"] if s else []

    return build(ids, tok, text)


def reference(
    engine,
    template: str,
    text: str,
    base: np.ndarray,
    deep: dict[int, np.ndarray] | None = None,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """Class logits of one example by a plain HF forward: `base` [P, H] at the prompt positions, `deep[i]`
    added to the hidden states entering layer i there (by a pre-hook registered here), `offset` rows added in
    order to the example's own token embeddings (special tokens included, extra rows ignored)."""
    model = engine.loaded.model
    before, after = example_pieces(engine, template, text)
    prompt_length = base.shape[0]
    placed = before + [-1] * prompt_length + after
    label_at = len(placed) - 1 if engine.causal else placed.index(engine.loaded.tokenizer.mask_token_id)
    with torch.no_grad():
        own = model.get_input_embeddings()(torch.tensor(before + after, dtype=torch.long)).clone()
        if offset is not None:
            rows = min(len(own), offset.shape[0])
            own[:rows] += torch.from_numpy(offset[:rows])
        embeds = torch.cat([own[: len(before)], torch.from_numpy(base.copy()), own[len(before) :]]).unsqueeze(0)
        span = slice(len(before), len(before) + prompt_length)
        handles = []
        for index, values in (deep or {}).items():

            def add(module, args, kwargs, values=values):
                if args:
                    hidden = args[0].clone()
                    hidden[0, span] += torch.from_numpy(values)
                    return (hidden, *args[1:]), kwargs
                hidden = kwargs["hidden_states"].clone()
                hidden[0, span] += torch.from_numpy(values)
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(transformer_layers(model)[index].register_forward_pre_hook(add, with_kwargs=True))
        try:
            logits = model(inputs_embeds=embeds).logits[0, label_at]
        finally:
            for handle in handles:
                handle.remove()
    return np.array([logits[ids[0]].item() for ids in verbalizer(engine)])


def references(engine, template, base, deep=None, offset=None, texts=TEXTS) -> np.ndarray:
    return np.stack([reference(engine, template, text, base, deep, offset) for text in texts])


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    """Logits of random tiny models are small (BERT's are ~0.1): a change is anything far above float noise."""
    assert np.abs(a - b).max() > 1e-5, np.abs(a - b).max()


def empty(engine) -> np.ndarray:
    return np.zeros((0, engine.info.hidden_size), np.float32)


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


def spec(seed: int, dim: int, shape: list[int], scale: float = 0.05, distribution: str = "normal") -> ProjectionSpec:
    return ProjectionSpec(seed=seed, scale=scale, dim=dim, shape=shape, distribution=distribution)


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


# ----------------------------------------------------------------------------------------------- the prefix cache


def mixed_population(seed: int) -> list[Candidate]:
    """Every form the cached path takes, with mixed prompt lengths, plus one offset (plain path)."""
    return [
        Candidate(),
        Candidate(soft_prompt=t(normal(seed, 3, HIDDEN))),
        Candidate(prompt_token_ids=[5, 6]),
        Candidate(deep_prompt=[t(normal(seed + 1, 4, HIDDEN)), t(normal(seed + 2, 4, HIDDEN))]),
        Candidate(prompt_token_ids=[7], deep_prompt=[None, t(normal(seed + 3, 1, HIDDEN))]),
        Candidate(soft_prompt=t(normal(seed + 4, 6, HIDDEN)), deep_prompt=[None, t(normal(seed + 5, 6, HIDDEN))]),
        offset_candidate(
            normal(seed + 6, 8, 2), normal(seed + 7, 2, HIDDEN), 0.5, soft_prompt=t(normal(seed + 8, 2, HIDDEN))
        ),
    ]


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
