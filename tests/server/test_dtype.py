"""The served dtype: bfloat16 keeps its prefix cache (the start-up check tolerates bfloat16's rounding, not a
wrong cache) and its cached path gives the plain path's logits and decisions; `/v1/model` says what is served."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from lmaas_runtime.forward import Forward
from lmaas_runtime.precision import relative_tolerance
from lmaas_server.engine.checks import compare
from tests.server.forms_support import evaluate, mixed_population
from tests.support.tiny_models import CAUSAL_KINDS

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_bfloat16_keeps_the_prefix_cache_and_matches_its_plain_path(engines, kind):
    cached, plain = engines(kind, dtype="bfloat16"), engines(kind, dtype="bfloat16", prefix_cache=False)
    assert cached.loaded.dtype == torch.bfloat16 and cached.prefix_cache is True
    assert (cached.info.dtype, cached.info.prefix_cache, plain.info.prefix_cache) == ("bfloat16", True, False)
    population = mixed_population(40)  # every prompt form; the offset's rows take the plain path in both
    got = evaluate(cached, population, "causal_suffix")
    want = evaluate(plain, population, "causal_suffix")
    assert got.dtype == np.float32
    difference, tolerance, flipped = compare(got, want, relative_tolerance(torch.bfloat16))
    assert difference <= tolerance and flipped == 0
    full = evaluate(engines(kind, dtype="float32", prefix_cache=False), population, "causal_suffix")
    assert compare(got, full, relative_tolerance(torch.bfloat16))[0] <= tolerance  # and float32's, to bf16 rounding


def test_the_start_up_check_still_turns_a_wrong_cache_off_in_bfloat16(engines, monkeypatch):
    original = Forward._prefix_inputs

    def forgetful(self, batch, suffix_attention):  # the suffix no longer sees the cached text
        inputs = original(self, batch, suffix_attention)
        inputs["attention_mask"][:, : -suffix_attention.shape[1]] = 0
        return inputs

    monkeypatch.setattr(Forward, "_prefix_inputs", forgetful)
    broken = engines("llama", dtype="bfloat16", max_batch_tokens=4096)  # a new engine: the check runs now
    assert broken.prefix_cache is False and broken.info.prefix_cache is False


def test_model_info_says_the_dtype_served_and_whether_the_prefix_cache_is_on(live_server):
    for kind, settings, dtype, on in (
        ("llama", {"dtype": "bfloat16"}, "bfloat16", True),
        ("llama", {"prefix_cache": False}, "float32", False),
        ("bert", {}, "float32", False),
    ):
        with live_server(kind, **settings) as server:
            info = httpx.get(f"{server.url}/v1/model").json()
        assert (info["dtype"], info["prefix_cache"]) == (dtype, on)
