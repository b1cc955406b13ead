"""A tuned prefix prompt exported as a PEFT prompt-tuning adapter reproduces the served label logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lmaas_client.cli import app
from lmaas_client.peft_export import SIDECAR, ExportError, export_peft, refusal
from lmaas_client.prompt_io import save_prompt
from lmaas_client.prompts import LowRank, ProjectedZ, PromptCandidate
from lmaas_protocol import Example, ProjectionSpec
from tests.support.tiny_models import HIDDEN, KINDS

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from lmaas_runtime import FrozenLM  # noqa: E402

TEMPLATES = {"masked": "{prompt} . {text_a} . It was {mask} .", "causal": "{prompt}Review: {text_a}\nSentiment:{mask}"}
EXAMPLES = [Example(text_a=t) for t in ("the movie was great", "a bad film , boring and dull .", "fun to watch")]
WORDS = ["great", "terrible"]
P = 4


def meta_for(lm: FrozenLM, **extra) -> dict:
    return {"template": TEMPLATES[lm.family], "family": lm.family, "placement": "prefix", "model": lm.name,
            "task": "sst2", "method": "bbt", **extra}  # fmt: skip


def peft_class_logits(folder, model_dir, lm: FrozenLM, candidate: PromptCandidate) -> torch.Tensor:
    """Label logits [examples, classes] from PEFT's model, fed each example's tokens after the prompt slot."""
    auto = transformers.AutoModelForCausalLM if lm.causal else transformers.AutoModelForMaskedLM
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(model_dir), str(folder)).eval()
    verbalizer = [ids[0] for ids in lm.label_ids(WORDS)]
    rows = []
    for rendered in lm.render(TEMPLATES[lm.family], EXAMPLES, candidate.length):
        rest = torch.tensor([rendered.ids[rendered.prompt_at :]])
        with torch.no_grad():
            logits = model(input_ids=rest, attention_mask=torch.ones_like(rest)).logits[0]  # [virtual + rest, V]
        rows.append(logits[rendered.label_position(candidate.length, lm.causal), verbalizer])
    return torch.stack(rows)


def served_class_logits(lm: FrozenLM, candidate: PromptCandidate) -> torch.Tensor:
    candidate = candidate.materialized()
    soft = None if candidate.soft is None else torch.from_numpy(np.asarray(candidate.soft, dtype=np.float32))
    rendered = lm.render(TEMPLATES[lm.family], EXAMPLES, candidate.length)
    with torch.no_grad():
        return lm.class_logits(rendered, lm.label_ids(WORDS), soft, candidate.token_ids)


def bbt_prompt(lm: FrozenLM, seed: int = 0) -> PromptCandidate:
    """BBT's form: a server-side projection A z added to the embeddings of random vocabulary tokens."""
    rng = np.random.default_rng(seed)
    spec = ProjectionSpec(seed=seed, dim=8, shape=[P, HIDDEN], scale=0.5)
    return PromptCandidate(token_ids=[int(t) for t in rng.integers(5, lm.vocab_size, P)],
                           soft=ProjectedZ(rng.normal(size=8), spec))  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_the_adapter_reproduces_the_served_label_logits(frozen, tiny_model_dirs, tmp_path, kind):
    lm = frozen(kind)
    candidate = bbt_prompt(lm)
    save_prompt(tmp_path / "prompt.npz", candidate, meta_for(lm))  # stores A z computed, as a run does
    exported = export_peft(tmp_path / "prompt.npz", tmp_path / "adapter", str(tiny_model_dirs[kind]), lm=lm)
    served = served_class_logits(lm, candidate)
    through_peft = peft_class_logits(tmp_path / "adapter", tiny_model_dirs[kind], lm, candidate)
    torch.testing.assert_close(through_peft, served, atol=1e-4, rtol=0)
    assert served.std() > 0.01  # logits that differ between examples and classes: a comparison that could fail
    # RoBERTa's <s> and BERT's [CLS] come before the prompt: they are the adapter's first virtual tokens
    framed = kind in ("bert", "roberta")
    assert len(exported.template_tokens) == (1 if framed else 0) and exported.virtual_tokens == P + framed
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == ("PROMPT_TUNING", exported.virtual_tokens)
    assert config["base_model_name_or_path"] == str(tiny_model_dirs[kind])
    sidecar = json.loads((tmp_path / "adapter" / SIDECAR).read_text())
    assert sidecar["template_tokens_in_adapter"] == exported.template_tokens and sidecar["calibration"] is None


def test_pure_soft_and_discrete_prompts_export_too(frozen, tiny_model_dirs, tmp_path):
    lm = frozen("llama")
    soft = np.random.default_rng(1).normal(size=(P, HIDDEN)).astype(np.float32)
    discrete = [int(t) for t in np.random.default_rng(2).integers(5, lm.vocab_size, P)]
    for name, candidate in (("soft", PromptCandidate(soft=soft)), ("bdpl", PromptCandidate(token_ids=discrete))):
        save_prompt(tmp_path / f"{name}.npz", candidate, meta_for(lm))
        export_peft(tmp_path / f"{name}.npz", tmp_path / name, str(tiny_model_dirs["llama"]), lm=lm)
        torch.testing.assert_close(peft_class_logits(tmp_path / name, tiny_model_dirs["llama"], lm, candidate),
                                   served_class_logits(lm, candidate), atol=1e-4, rtol=0)  # fmt: skip


def test_forms_without_a_peft_equivalent_are_refused_by_name(tmp_path):
    soft = np.zeros((P, HIDDEN), dtype=np.float32)
    meta = {"template": TEMPLATES["causal"], "family": "causal", "placement": "prefix"}
    cases = [
        (PromptCandidate(soft=soft), {**meta, "placement": "suffix"}, "a suffix prompt"),
        (PromptCandidate(deep=[soft, soft]), meta, "a deep prompt (BBTv2"),
        (PromptCandidate(offset=LowRank(np.zeros((2, 1)), np.zeros((1, HIDDEN)))), meta, "DePT embedding offset"),
        (PromptCandidate(), meta, "the prompt is empty"),
        (
            PromptCandidate(soft=soft),
            {**meta, "template": "Review: {text_a}{prompt}\nSentiment:{mask}"},
            "before {prompt}",
        ),
    ]
    for candidate, prompt_meta, needle in cases:
        assert needle in refusal(candidate, prompt_meta)
        save_prompt(tmp_path / "p.npz", candidate, prompt_meta)
        with pytest.raises(ExportError, match="cannot export as a PEFT adapter"):
            export_peft(tmp_path / "p.npz", tmp_path / "out", "unused-base-model")  # refused before loading it
    assert refusal(PromptCandidate(soft=soft), {**meta, "template": "Instruction: {prompt}{text_a}{mask}"}) is None


def test_a_prompt_for_another_model_is_refused(frozen, tmp_path):
    lm = frozen("gpt2")
    save_prompt(tmp_path / "wide.npz", PromptCandidate(soft=np.zeros((P, HIDDEN * 2), np.float32)), meta_for(lm))
    with pytest.raises(ExportError, match="64 wide, but the base model's hidden size is 32"):
        export_peft(tmp_path / "wide.npz", tmp_path / "out", "gpt2", lm=lm)
    save_prompt(tmp_path / "masked.npz", PromptCandidate(soft=np.zeros((P, HIDDEN), np.float32)),
                {**meta_for(lm), "family": "masked"})  # fmt: skip
    with pytest.raises(ExportError, match="tuned on a masked LM"):
        export_peft(tmp_path / "masked.npz", tmp_path / "out", "gpt2", lm=lm)


def test_cli_exports_and_says_what_is_lost(frozen, tiny_model_dirs, tmp_path):
    lm = frozen("gpt2")
    calibration = {"scale": 1.0, "bias": [0.1, -0.1]}
    save_prompt(tmp_path / "prompt.npz", bbt_prompt(lm, seed=3), meta_for(lm, calibration=calibration))
    exported = CliRunner().invoke(app, ["export-peft", str(tmp_path / "prompt.npz"), "--out", str(tmp_path / "adapter"),
                                        "--base-model", str(tiny_model_dirs["gpt2"])])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    assert "calibration is not in the adapter" in exported.output and str(tmp_path / "adapter") in exported.output
    assert json.loads((tmp_path / "adapter" / SIDECAR).read_text())["calibration"] == calibration
    save_prompt(tmp_path / "suffix.npz", bbt_prompt(lm), meta_for(lm, placement="suffix"))
    refused = CliRunner().invoke(app, ["export-peft", str(tmp_path / "suffix.npz"), "--out", str(tmp_path / "x"),
                                       "--base-model", "gpt2"])  # fmt: skip
    assert refused.exit_code == 1 and "a suffix prompt sits after the text" in refused.output
    assert not (tmp_path / "x").exists()
