"""The transformers half of model loading that server and client share (lmaas_runtime.loading)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from lmaas_runtime.loading import config_family, dequantised
from lmaas_runtime.source import ModelSource, converted_folder, default_source


@pytest.mark.parametrize(
    ("config", "family"),
    [
        (transformers.BertConfig(), "masked"),
        (transformers.BertConfig(is_decoder=True), "causal"),  # BERT as a decoder: BertLMHeadModel
        (transformers.LlamaConfig(), "causal"),
        (transformers.GPT2Config(), "causal"),
        (transformers.T5Config(), None),  # encoder-decoder: neither family
        (transformers.LlamaConfig(architectures=["LlamaForCausalLM"]), "causal"),
        (transformers.BertConfig(architectures=["BertForPreTraining"]), "masked"),
    ],
)
def test_config_family_by_transformers_head_mappings(config, family):
    assert config_family(config) == family


def test_a_converted_copy_is_reused_without_converting_again(tmp_path: Path):
    source = ModelSource("m", str(tmp_path), "m.Q4.gguf")  # no such GGUF file: converting would fail
    target = converted_folder(source, tmp_path / "cache", transformers.__version__)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert dequantised(source, tmp_path / "cache") == ModelSource("m", str(target))


def test_the_default_gguf_is_dequantised_once_into_a_loadable_folder(tmp_path: Path):
    source = default_source()
    copy = dequantised(source, tmp_path)
    folder = Path(copy.path)
    assert copy.gguf_file is None and copy.name == source.name
    assert folder.parent == tmp_path / "converted" and (folder / "config.json").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".convert-")]  # staging cleaned up
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config_family(config) == "causal" and not hasattr(config, "quantization_config")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer(" positive")["input_ids"]
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert dequantised(source, tmp_path) == copy and (folder / "config.json").stat().st_mtime_ns == stamp
