"""Devices and dtypes: `auto` dtype per device, weights loaded straight onto their device, SDPA attention, and a
model spread by a device map (here: one layer offloaded to disk through accelerate's hooks, the CPU way to run
a model split across devices) giving the single-device logits on every path of the server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmaas_protocol import Candidate, EvaluateRequest, Example, InputsSpec, LayerStdRequest
from tests.server.support import TEMPLATES, TEXTS, label_ids, normal, tensor_json
from tests.support.tiny_models import HIDDEN

torch = pytest.importorskip("torch")
from lmaas_runtime import FrozenLM, ModelError  # noqa: E402
from lmaas_runtime.hooks import DeepPromptHooks  # noqa: E402
from lmaas_runtime.loading import parse_device_map, pick_dtype  # noqa: E402
from lmaas_server.metering.budget import CallBudget  # noqa: E402

# layer 1 of the tiny llama lives on disk and is brought in by accelerate's hook at each forward pass
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.mark.parametrize(
    ("capability", "setting", "expected"),
    [
        ((9, 0), "auto", "bfloat16"),  # Hopper
        ((8, 0), "auto", "bfloat16"),  # Ampere
        ((7, 5), "auto", "float32"),  # Turing: no native bfloat16, and float16 overflows many models
        ((6, 0), "auto", "float32"),
        ((7, 5), "float16", "float16"),  # asked for explicitly
        ((9, 0), "float32", "float32"),
    ],
)
def test_auto_dtype_on_gpus_prefers_float32_to_float16(monkeypatch, capability, setting, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated bf16 does not count
    assert pick_dtype(setting, torch.device("cuda")) == getattr(torch, expected)


def test_weights_load_onto_their_device_without_a_copy_and_with_sdpa(tiny_model_dirs, monkeypatch):
    def no_copy(self, *args, **kwargs):
        raise AssertionError("the model was copied with .to() after loading")

    monkeypatch.setattr(torch.nn.Module, "to", no_copy)
    for kind in ("llama", "bert"):
        lm = FrozenLM.load(str(tiny_model_dirs[kind]), device="cpu")
        assert lm.model.config._attn_implementation == "sdpa" and lm.device == torch.device("cpu")


def test_device_map_settings_are_checked():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    with pytest.raises(ModelError, match="device_map"):
        parse_device_map("everywhere")
    with pytest.raises(ModelError, match="JSON"):
        parse_device_map("{not json")


def test_deep_prompts_take_the_dtype_and_device_of_the_layer_input():
    class Layer(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    layers = torch.nn.ModuleList([Layer(), Layer()])
    hooks = DeepPromptHooks(layers)
    values = torch.ones(2, 4)  # float32 prompt values, the layer computes in bfloat16
    hooks.additions = {1: (torch.tensor([0, 1]), torch.tensor([2, 0]), values)}
    out = layers[1](hidden_states=torch.zeros(2, 3, 4, dtype=torch.bfloat16))  # passed by keyword
    assert out.dtype == torch.bfloat16 and out[0, 2].tolist() == [1.0] * 4 and out[1, 0].tolist() == [1.0] * 4
    assert float(out.sum()) == 8


def test_a_model_split_by_a_device_map_serves_the_same_logits(engines, tmp_path_factory):
    whole = engines("llama")
    split = engines("llama", device_map=json.dumps(SPLIT), cache_dir=str(tmp_path_factory.mktemp("offload")))
    assert set(split.loaded.model.hf_device_map.values()) == {"cpu", "disk"}
    assert split.prefix_cache is True  # the start-up check of the cached path passed across the split
    assert split.info.layer_std == pytest.approx(whole.info.layer_std, rel=1e-5)
    candidates = [
        Candidate.model_validate({"soft_prompt": tensor_json(normal(1, 3, HIDDEN))}),
        Candidate.model_validate({"deep_prompt": [tensor_json(normal(2, 3, HIDDEN)), tensor_json(normal(3, 3, HIDDEN))]}),
    ]  # fmt: skip
    for template in (TEMPLATES["causal"], TEMPLATES["causal_front"]):  # cached text, then the plain path
        got = []
        for engine in (whole, split):
            spec = InputsSpec(template=template, examples=[Example(text_a=t, label=0) for t in TEXTS],
                              verbalizer=label_ids(engine))  # fmt: skip
            handle = engine.register_inputs(spec).handle
            response = engine.evaluate(EvaluateRequest(inputs=handle, candidates=candidates), CallBudget(None))
            got.append(np.stack([r.logits.to_numpy() for r in response.results]))
            std = engine.measure_layer_std(LayerStdRequest(inputs=handle), CallBudget(None)).layer_std
            got.append(np.array(std))
            engine.inputs.delete(handle)
        np.testing.assert_allclose(got[2], got[0], atol=1e-5)
        np.testing.assert_allclose(got[3], got[1], rtol=1e-5)
