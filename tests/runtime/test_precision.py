"""Low precision in the runtime: label logits in float32 from the label position's hidden state (never the
vocabulary product), the check that falls back to the model's own head, bfloat16's cached path against its plain
path, and the CPU flags `auto` reads."""

from __future__ import annotations

import pytest

from lmaas_protocol import Example
from tests.support.tiny_models import CAUSAL_KINDS, HIDDEN, KINDS

torch = pytest.importorskip("torch")
from lmaas_runtime import FrozenLM, Row, RowPrompt  # noqa: E402
from lmaas_runtime.loading import pick_dtype  # noqa: E402
from lmaas_runtime.precision import cpu_native_bf16, relative_tolerance  # noqa: E402
from lmaas_runtime.rows import Verbalizer  # noqa: E402

TEMPLATES = {"masked": "{prompt} . {text_a} . It was {mask} .", "causal": "Review: {text_a}\n{prompt}Sentiment:{mask}"}
EXAMPLES = [Example(text_a=t) for t in ("the movie was great", "a bad film , boring and dull .", "fun to watch")]


@pytest.fixture(scope="module")
def bf16(tiny_model_dirs):
    cache: dict[str, FrozenLM] = {}

    def get(kind: str) -> FrozenLM:
        if kind not in cache:
            cache[kind] = FrozenLM.load(str(tiny_model_dirs[kind]), dtype="bfloat16", max_length=128)
        return cache[kind]

    return get


def _soft(length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.5


def _rows(lm: FrozenLM, prompt: RowPrompt) -> tuple[list[Row], Verbalizer]:
    verbalizer = Verbalizer.build(lm.label_ids(["great", "terrible"]), lm.device)
    rendered = lm.render(TEMPLATES[lm.family], EXAMPLES, prompt.length)
    return [Row(example, prompt, verbalizer) for example in rendered], verbalizer


@pytest.mark.parametrize("kind", KINDS)
def test_label_logits_are_float32_and_skip_the_vocabulary_product(bf16, kind):
    lm = bf16(kind)
    assert lm.dtype == torch.bfloat16 and lm.forward.head.direct  # the start-up check kept the float32 path
    rows, verbalizer = _rows(lm, RowPrompt(4, soft=_soft(4, 1).to(torch.bfloat16)))
    shapes: list[tuple[int, ...]] = []
    handle = lm.forward.head.module.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            hidden, logits = lm.forward.label_states(rows)
    finally:
        handle.remove()
    assert logits is None and hidden.shape == (len(rows), HIDDEN)
    assert shapes == [(len(rows), 0, lm.vocab_size)]  # the head mapped no position: no [B, vocab] tensor
    ours = lm.forward.class_logits(hidden, None, verbalizer)
    assert ours.dtype == torch.float32
    # the same rows through the model's own bfloat16 head, then cast: equal up to its rounding, which ours lacks
    lm.forward.head.direct = False
    try:
        with torch.no_grad():
            _, theirs = lm.forward.label_states(rows)
    finally:
        lm.forward.head.direct = True
    theirs = verbalizer(theirs.float())
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(
        ours, theirs, atol=relative_tolerance(torch.bfloat16) * float(theirs.abs().max()), rtol=0
    )
    words = lm.forward.head.logits(hidden, verbalizer.index)
    assert (words != words.bfloat16().float()).any()  # float32 values, not bfloat16 ones widened


def test_a_head_that_is_not_a_plain_linear_map_falls_back_to_the_models_own(tiny_model_dirs):
    lm = FrozenLM.load(str(tiny_model_dirs["llama"]), max_length=128)
    rows, verbalizer = _rows(lm, RowPrompt(2, soft=_soft(2, 3)))
    with torch.no_grad():
        direct = lm.forward.class_logits(*lm.forward.label_states(rows), verbalizer)
    # a scaling we would apply but this model's head does not: the check sees the difference and falls back
    lm.model.config.logits_scaling = 4.0
    try:
        assert lm.forward.head.verify() is False and lm.forward.head.direct is False
        with torch.no_grad():
            hidden, logits = lm.forward.label_states(rows)
        assert hidden is None and logits.shape == (len(rows), lm.vocab_size)
        torch.testing.assert_close(lm.forward.class_logits(hidden, logits, verbalizer), direct, atol=1e-5, rtol=0)
    finally:
        del lm.model.config.logits_scaling


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_bfloat16_cached_path_equals_its_plain_path(bf16, kind):
    lm = bf16(kind)
    rendered = lm.render(TEMPLATES["causal"], EXAMPLES, 4)
    verbalizer = lm.label_ids(["great", "terrible"])
    soft = _soft(4, 5)
    with torch.no_grad():
        cached = lm.class_logits(lm.prepare(rendered, cache_text=True), verbalizer, soft)
        plain = lm.class_logits(lm.prepare(rendered, cache_text=False), verbalizer, soft)
    assert lm.prepare(rendered).prefix.keys[0].dtype == torch.bfloat16  # the cache is kept in the served dtype
    tolerance = relative_tolerance(torch.bfloat16) * float(plain.abs().max())
    torch.testing.assert_close(cached, plain, atol=tolerance, rtol=0)
    margin = (plain[:, 0] - plain[:, 1]).abs()
    clear = margin > tolerance
    assert torch.equal(cached.argmax(-1)[clear], plain.argmax(-1)[clear])


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_native_bf16(flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n")
    assert cpu_native_bf16(flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_native_bf16(flags)
    assert not cpu_native_bf16(tmp_path / "missing")
    import lmaas_runtime.loading as loading

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_native_bf16", lambda native=native: native)
        assert pick_dtype("auto", torch.device("cpu")) == expected
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_one_overflow_check_for_a_population_names_the_first_bad_prompt():
    from lmaas_runtime.rows import first_overflow

    fine = RowPrompt(2, soft=_soft(2, 7).to(torch.bfloat16))
    empty = RowPrompt(0)
    bad = RowPrompt(2, deep={1: torch.tensor([[1.0, float("inf")], [0.0, 0.0]])})
    nan = RowPrompt(1, offset=torch.tensor([[float("nan"), 0.0]]))
    assert first_overflow([fine, empty, bad, nan]) == 2
    assert first_overflow([nan, bad]) == 0
    assert first_overflow([fine, empty]) is None and first_overflow([empty]) is None
    assert fine.finite() and empty.finite() and not bad.finite() and not nan.finite()
