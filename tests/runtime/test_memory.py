"""Bounded memory, known before the work: the prefix cache's bytes from the config, batches sized by the tokens
they compute, the batch budget from a device's free memory, and layer stds measured in passes."""

from __future__ import annotations

import pytest

from lmaas_protocol import Example
from tests.support.tiny_models import CAUSAL_KINDS

torch = pytest.importorskip("torch")
from lmaas_runtime import Row, RowPrompt, batches, memory, probes  # noqa: E402
from lmaas_runtime.prefix import compute_prefix  # noqa: E402

TEMPLATE = "Review: {text_a}\n{prompt}Sentiment:{mask}"
TEXTS = ["the movie was great", "a bad film , boring and dull .", "fun to watch", "thin plot", "it was terrible"]
EXAMPLES = [Example(text_a=t) for t in TEXTS]


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefix_bytes_are_known_from_the_config_before_computing(frozen, kind):
    lm = frozen(kind)
    rendered = lm.render(TEMPLATE, EXAMPLES, 3)
    width = max(e.prompt_at for e in rendered)
    estimate = memory.prefix_bytes(lm.model.config, lm.dtype.itemsize, len(rendered), width)
    assert estimate == compute_prefix(lm.model, rendered, lm.pad_id, 64).nbytes


def test_batches_are_sized_by_the_tokens_they_compute(frozen):
    lm = frozen("llama")
    rendered = lm.render(TEMPLATE, EXAMPLES, 2)
    prefix = compute_prefix(lm.model, rendered, lm.pad_id, 4096)
    prompt = RowPrompt(2, token_ids=[5, 6])
    rows = [Row(e, prompt, prefix=prefix, prefix_row=i) for i, e in enumerate(rendered)] * 8  # 40 cached rows
    computed = max(row.cost for row in rows)
    assert computed == max(e.length(2) - e.prompt_at for e in rendered) and rows[0].context == prefix.width
    budget = 8 * (computed + prefix.width)  # 8 rows if cached positions counted as computed tokens
    sizes = [len(b) for b in batches(rows, budget, context_weight=0.25)]
    assert sum(sizes) == 40 and max(sizes) == budget // (computed + 0.25 * prefix.width) > 8
    plain = [Row(e, prompt) for e in rendered]  # the plain path computes every token
    cut = list(batches(plain, 2 * max(r.cost for r in plain)))
    assert sum(map(len, cut)) == 5 and len(cut) >= 2
    assert all(len(b) * max(r.cost for r in b) <= 2 * max(r.cost for r in plain) for b in cut)


def test_context_weight_and_batch_tokens_from_free_memory():
    # SmolLM2-135M's shape: 30 layers, 9 heads (3 for keys/values) of 64, hidden 576, MLP 1536
    config = type("Config", (), dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                     hidden_size=576, intermediate_size=1536))()  # fmt: skip
    assert memory.kv_bytes_per_token(config, 2) == 30 * 2 * 3 * 64 * 2
    assert 0 < memory.context_weight(config, 2) < 1
    per_token = memory.activation_bytes_per_token(config, 2)
    assert memory.batch_tokens_for(config, 2, 8 << 30) == min(memory.MAX_BATCH_TOKENS, (4 << 30) // per_token)
    assert memory.batch_tokens_for(config, 2, 1 << 20) == memory.MIN_BATCH_TOKENS
    assert memory.batch_tokens_for(config, 2, 1 << 40) == memory.MAX_BATCH_TOKENS


def test_the_default_batch_budget_follows_the_free_memory_on_cuda(frozen, monkeypatch):
    model = frozen("llama").model
    assert memory.default_batch_tokens(model) == memory.CPU_BATCH_TOKENS  # no CUDA device among its weights
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 1 << 30)  # as if on a GPU with 1 GiB free
    expected = memory.batch_tokens_for(model.config, 4, 1 << 30)
    assert memory.default_batch_tokens(model) == expected != memory.CPU_BATCH_TOKENS


def test_an_out_of_memory_error_is_recognised():
    assert memory.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert memory.is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))


def test_layer_std_runs_in_passes_and_gives_the_same_values(frozen, monkeypatch):
    lm = frozen("llama")
    rendered = lm.render(TEMPLATE, EXAMPLES * 4, 0)  # 20 examples
    passes: list[int] = []
    hook = lm.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(1), with_kwargs=True
    )
    try:
        whole = lm.layer_std(rendered)
        assert len(passes) == 1
        widest = max(len(e.ids) for e in rendered)
        chunked = lm.layer_std(rendered, max_batch_tokens=3 * widest)
    finally:
        hook.remove()
    assert len(passes) == 1 + 7  # 20 examples, at most 3 a pass
    assert chunked == pytest.approx(whole, rel=1e-5)
    sizes: list[int] = []  # values per layer reach the statistic on the host, at most max_values of them
    original = probes.clipped_std
    monkeypatch.setattr(probes, "clipped_std", lambda values: sizes.append(values.numel()) or original(values))
    cap = sum(len(e.ids) for e in rendered) * lm.hidden_size // 3
    sampled = probes.layer_std(lm.model, lm.layers, rendered, lm.pad_id, 3 * widest, max_values=cap)
    assert sizes and max(sizes) <= cap
    assert sampled == pytest.approx(whole, rel=0.15)  # every third token: a uniform subsample
