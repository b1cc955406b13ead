"""Tasks, the shipped data, stratified subsampling, and prompt files (losses and metrics: tests/protocol/test_scoring.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from lmaas_client import LMaaSClient
from lmaas_client.evaluation import build_verbalizer
from lmaas_client.prompt_io import load_prompt, save_prompt
from lmaas_client.prompts import PromptCandidate
from lmaas_client.tasks import TASKS, TaskError, TaskSpec, get_task
from lmaas_client.tasks.data import load_split, resolve_data_dir, split_path, stratified_subsample
from lmaas_protocol import Example, parse_template
from tests.conftest import REPO
from tests.support.tiny_models import KINDS

DATA = REPO / "data"
SST2_SEEDS = (13, 21, 42, 87, 100)


# ----------------------------------------------------------------------------------------- tasks


def test_sst2_spec():
    spec = get_task("sst2")
    assert spec is TASKS["sst2"]
    assert spec.label_names == ("negative", "positive") and spec.num_classes == 2
    assert spec.metric == "accuracy" and spec.seeds == SST2_SEEDS
    assert spec.label_words["masked"] == (" bad", " great")
    for family in ("masked", "causal"):
        for placement in ("prefix", "suffix"):
            slots = {s.value for s in parse_template(spec.template(family, placement)) if s.kind == "slot"}
            assert slots == {"prompt", "text_a", "mask"}
    assert spec.template("causal").endswith("{mask}")  # causal LMs read the answer after the cue


def test_unknown_task_names_the_shipped_ones():
    with pytest.raises(TaskError) as caught:
        get_task("sst3")
    assert "'sst3'" in str(caught.value) and "sst2" in str(caught.value)


def test_task_spec_rejects_label_words_that_do_not_match_the_classes():
    with pytest.raises(TaskError, match="label words"):
        TaskSpec(name="broken", label_names=("a", "b", "c"), templates={"causal": {"prefix": "{text_a}{mask}"}},
                 label_words={"causal": (" x", " y")})  # fmt: skip
    spec = TaskSpec(name="causal-only", label_names=("a", "b"), templates={"causal": {"prefix": "{prompt}{text_a}{mask}"}},
                    label_words={"causal": (" x", " y")})  # fmt: skip
    with pytest.raises(TaskError, match="no suffix template"):
        spec.template("causal", "suffix")
    with pytest.raises(TaskError, match="masked"):
        spec.template("masked")


@pytest.mark.parametrize("kind", KINDS)
def test_label_words_tokenize_to_distinct_known_first_tokens(live_server, kind):
    with live_server(kind) as server, LMaaSClient(server.url) as client:
        family = client.model_info().family
        words = get_task("sst2").label_words[family]
        ids = build_verbalizer(client, words)
        tokens = client.tokenize(list(words), return_tokens=True).tokens
    assert len({i[0] for i in ids}) == 2
    first = [t[0].lstrip("Ġ▁").lower() for t in tokens]
    assert first == [w.strip() for w in words]  # whole words, not [UNK] or byte pieces


# ----------------------------------------------------------------------------------------- shipped data


@pytest.mark.parametrize("seed", SST2_SEEDS)
def test_sst2_splits_load_for_every_seed(seed):
    spec = get_task("sst2")
    train = load_split(spec, "train", seed, DATA)
    dev = load_split(spec, "dev", seed, DATA)
    assert len(train) == 32 and len(dev) == 32
    assert Counter(e.label for e in train) == {0: 16, 1: 16}
    assert set(e.label for e in dev) == {0, 1}
    assert all(isinstance(e, Example) and e.text_a and e.text_b is None for e in train + dev)
    assert {e.text_a for e in train}.isdisjoint({e.text_a for e in dev})


def test_sst2_test_set_and_seeds_differ():
    spec = get_task("sst2")
    test = load_split(spec, "test", 42, DATA)
    assert len(test) == 872 and Counter(e.label for e in test) == {0: 428, 1: 444}
    assert load_split(spec, "train", 13, DATA) != load_split(spec, "train", 21, DATA)


def test_bad_seed_names_the_available_seeds():
    with pytest.raises(TaskError) as caught:
        load_split(get_task("sst2"), "train", 7, DATA)
    message = str(caught.value)
    assert "seed 7" in message and all(str(s) in message for s in SST2_SEEDS)


def test_data_dir_resolution(tmp_path, monkeypatch):
    assert resolve_data_dir(DATA) == DATA
    monkeypatch.setenv("LMAAS_DATA_DIR", str(DATA))
    assert resolve_data_dir() == DATA
    (tmp_path / "sst2").mkdir()
    assert resolve_data_dir(tmp_path) == tmp_path  # explicit beats the environment
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMAAS_DATA_DIR")
    assert resolve_data_dir() == tmp_path / "data"  # then ./data


def test_explicit_data_dir_without_data_is_an_error(tmp_path):
    with pytest.raises(TaskError):
        resolve_data_dir(tmp_path / "missing")


def test_broken_split_files_are_task_errors(tmp_path):
    spec = get_task("sst2")
    folder = tmp_path / "sst2" / "16-13"
    folder.mkdir(parents=True)
    with pytest.raises(TaskError, match="missing split file"):
        load_split(spec, "train", 13, tmp_path)
    (folder / "train.jsonl").write_text('{"label": 0, "text_a": "fine"}\n\n{"text_a": "no label"}\n')
    with pytest.raises(TaskError, match=r"train.jsonl:3: bad record"):
        load_split(spec, "train", 13, tmp_path)
    (folder / "train.jsonl").write_text('{"label": 0, "text_a": "fine", "extra": 1}\nnot json\n')
    with pytest.raises(TaskError, match=r"train.jsonl:2: bad record"):
        load_split(spec, "train", 13, tmp_path)
    (folder / "dev.jsonl").write_text('{"label": 1, "text_a": "good"}\n{"label": 0, "text_a": "bad"}\n')
    assert [e.label for e in load_split(spec, "dev", 13, tmp_path)] == [1, 0]
    assert split_path(spec, "test", 7, tmp_path) == tmp_path / "sst2" / "test.jsonl"  # one test set for all seeds


# ----------------------------------------------------------------------------------------- subsampling


def _examples(labels) -> list[Example]:
    return [Example(text_a=f"text {i}", label=int(label)) for i, label in enumerate(labels)]


def test_stratified_subsample_is_deterministic_sized_stratified_and_ordered():
    test = load_split(get_task("sst2"), "test", 42, DATA)
    position = {id(e): i for i, e in enumerate(test)}
    for size in (16, 100, 871):
        chosen = stratified_subsample(test, size, 42)
        assert len(chosen) == size
        assert chosen == stratified_subsample(test, size, 42)
        counts = Counter(e.label for e in chosen)
        for label, total in ((0, 428), (1, 444)):
            assert abs(counts[label] - size * total / 872) < 1
        indices = [position[id(e)] for e in chosen]
        assert indices == sorted(indices) and len(set(indices)) == size  # original order, no repeats
    assert stratified_subsample(test, 16, 42) != stratified_subsample(test, 16, 13)
    assert Counter(e.label for e in stratified_subsample(test, 16, 42)) == {0: 8, 1: 8}


def test_stratified_subsample_hands_out_the_remainder_by_largest_share():
    examples = _examples([0] * 10 + [1] * 30 + [2] * 60)
    assert Counter(e.label for e in stratified_subsample(examples, 10, 0)) == {0: 1, 1: 3, 2: 6}
    assert Counter(e.label for e in stratified_subsample(examples, 7, 0)) == {0: 1, 1: 2, 2: 4}  # 0.7, 2.1, 4.2
    assert len(stratified_subsample(examples, 1, 0)) == 1


def test_stratified_subsample_keeps_everything_when_not_smaller():
    examples = _examples([0, 1, 1])
    assert stratified_subsample(examples, None, 1) is examples
    assert stratified_subsample(examples, 3, 1) == examples
    assert stratified_subsample(examples, 10, 1) == examples


# ----------------------------------------------------------------------------------------- prompt files


META = {"task": "sst2", "template": "{prompt} . {text_a} . It was {mask} .", "model": "tiny", "family": "masked",
        "placement": "prefix", "method": "bbt", "seed": 42}  # fmt: skip


def test_prompt_roundtrip_without_pickle(tmp_path):
    soft = np.random.default_rng(0).normal(0, 0.1, (3, 16)).astype(np.float32)
    z = np.random.default_rng(1).normal(0, 1, 8)
    path = tmp_path / "nested" / "prompt.npz"
    save_prompt(path, PromptCandidate(soft=soft, token_ids=[1000, 1001, 5], z=z), META)

    candidate, meta = load_prompt(path)
    assert meta == META
    np.testing.assert_array_equal(candidate.soft, soft)
    assert candidate.soft.dtype == np.float32
    assert candidate.token_ids == [1000, 1001, 5] and all(type(i) is int for i in candidate.token_ids)
    np.testing.assert_array_equal(candidate.z, z)

    with np.load(path, allow_pickle=False) as data:  # readable anywhere, no pickles inside
        assert set(data.files) == {"meta", "soft_prompt", "prompt_token_ids", "z"}
        assert data["prompt_token_ids"].dtype == np.int64 and data["z"].dtype == np.float64
        assert json.loads(str(data["meta"])) == META
        assert all(data[key].dtype != object for key in data.files)  # reading an object array would raise


def test_prompt_roundtrip_of_pure_soft_and_empty_prompts(tmp_path):
    soft = np.ones((2, 4), dtype=np.float32)
    save_prompt(tmp_path / "soft.npz", PromptCandidate(soft=soft), META)
    candidate, _ = load_prompt(tmp_path / "soft.npz")
    assert candidate.token_ids is None and candidate.z is None
    np.testing.assert_array_equal(candidate.soft, soft)

    save_prompt(tmp_path / "empty.npz", PromptCandidate(), {"task": "sst2"})
    candidate, meta = load_prompt(tmp_path / "empty.npz")
    assert candidate.soft is None and candidate.token_ids is None and candidate.length == 0
    assert meta == {"task": "sst2"}
