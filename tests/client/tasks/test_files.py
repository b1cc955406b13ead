"""User tasks: CSV/TSV/JSONL files with a task file (TOML or JSON) or settings given directly."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from lmaas_client.tasks import TASKS, TaskError
from lmaas_client.tasks.data import load_split, load_task_data, load_test
from lmaas_client.tasks.files import (
    load_task_file,
    resolve_task,
    save_task_file,
    task_file_settings,
    user_task,
)
from lmaas_protocol import Example
from tests.conftest import REPO

TRAIN_CSV = "label,text\nnegative,awful food\npositive,lovely place\n0,cold soup\n1,great staff\n"
DEV_CSV = "label,text\n1,nice\n0,bad\n"
TEST_CSV = "label,text\n" + "".join(f"{i % 2},review number {i}\n" for i in range(10))

BASE: dict = {
    "name": "reviews",
    "description": "restaurant reviews",
    "label_names": ["negative", "positive"],
    "files": {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"},
    "columns": {"text_a": "text", "label": "label"},
    "label_words": {"masked": [" bad", " great"], "causal": [" negative", " positive"]},
    "templates": {"causal": "Review: {text_a}\nSentiment:{mask}", "masked": "{text_a} . It was {mask} ."},
}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def to_toml(config: dict) -> str:
    """Enough TOML for these tests: scalars and lists (JSON literals are valid TOML), then tables."""
    lines: list[str] = []

    def emit(prefix: str | None, table: dict) -> None:
        if prefix:
            lines.append(f"[{prefix}]")
        nested = []
        for key, value in table.items():
            if isinstance(value, dict):
                nested.append((f"{prefix}.{key}" if prefix else key, value))
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        for name, sub in nested:
            emit(name, sub)

    emit(None, config)
    return "\n".join(lines) + "\n"


def merged(**changes) -> dict:
    config = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict) and isinstance(config.get(key), dict) and key in ("files", "columns"):
            config[key].update(value)
        else:
            config[key] = value
    return config


@pytest.fixture
def folder(tmp_path) -> Path:
    write(tmp_path / "train.csv", TRAIN_CSV)
    write(tmp_path / "dev.csv", DEV_CSV)
    write(tmp_path / "test.csv", TEST_CSV)
    return tmp_path


def task_file(folder: Path, config: dict | None = None, name: str = "task.toml") -> Path:
    config = config or BASE
    text = json.dumps(config, indent=2) if name.endswith(".json") else to_toml(config)
    return write(folder / name, text)


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def error(call, *args, **kwargs) -> str:
    with pytest.raises(TaskError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# ----------------------------------------------------------------------------------------- happy paths


def test_csv_task_file_with_label_names_and_ids(folder, monkeypatch):
    path = task_file(folder)
    spec = load_task_file(path)
    assert spec.name == "reviews" and spec.label_names == ("negative", "positive") and spec.num_classes == 2
    assert spec.source == str(path) and spec.seeds == () and spec.metric == "accuracy"
    assert spec.text_fields == ("text_a",) and spec.description == "restaurant reviews"
    train = load_split(spec, "train", 13)
    assert [(e.text_a, e.label) for e in train] == [("awful food", 0), ("lovely place", 1), ("cold soup", 0),
                                                    ("great staff", 1)]  # fmt: skip
    assert all(isinstance(e, Example) and e.text_b is None for e in train)
    # one fixed split whatever the seed, and no data folder is needed
    monkeypatch.setenv("LMAAS_DATA_DIR", str(folder / "nowhere"))
    monkeypatch.chdir(folder)
    data = load_task_data(spec, 7)
    assert data.train == train and len(data.dev) == 2 and len(data.test) == 10 and data.test_subsample_seed is None


def test_templates_without_prompt_get_both_placements(folder):
    spec = load_task_file(task_file(folder))
    assert spec.templates["causal"] == {
        "prefix": "{prompt}Review: {text_a}\nSentiment:{mask}",
        "suffix": "Review: {text_a}\n{prompt}Sentiment:{mask}",  # right before the answer cue
    }
    assert spec.templates["masked"] == {
        "prefix": "{prompt}{text_a} . It was {mask} .",
        "suffix": "{text_a}{prompt} . It was {mask} .",  # no line break after the text: right after it
    }
    assert spec.label_words == {"masked": (" bad", " great"), "causal": (" negative", " positive")}


def test_tsv_pair_task_with_label_names(folder):
    write(folder / "pairs" / "train.tsv", "premise\thypothesis\tgold\nA man sleeps.\tA man rests.\tyes\n"
          'He said "hi".\tNobody spoke.\tno\n')  # fmt: skip
    write(folder / "pairs" / "dev.tsv", "premise\thypothesis\tgold\nx\ty\tno\n")
    write(folder / "pairs" / "test.tsv", "premise\thypothesis\tgold\r\nx\ty\tyes\r\n\r\nz\tw\tno\r\n")
    config = merged(
        name="pairs",
        label_names=["yes", "no"],
        files={"train": "pairs/train.tsv", "dev": "pairs/dev.tsv", "test": "pairs/test.tsv"},
        columns={"text_a": "premise", "text_b": "hypothesis", "label": "gold"},
        label_words=[" Yes", " No"],
        templates="{text_a}\nQuestion: {text_b} Yes or No?\nAnswer:{mask}",
    )
    spec = load_task_file(task_file(folder, config))
    assert spec.text_fields == ("text_a", "text_b")
    assert set(spec.templates) == {"masked", "causal"}  # one template and one word list for both families
    assert spec.template("causal", "suffix") == "{text_a}\nQuestion: {text_b} Yes or No?\n{prompt}Answer:{mask}"
    train = load_split(spec, "train", 0)
    assert train[1] == Example(text_a='He said "hi".', text_b="Nobody spoke.", label=1)  # TSV: quotes are text
    assert [e.label for e in load_split(spec, "test", 0)] == [0, 1]  # CRLF and blank lines


def test_jsonl_with_integer_ids_and_names_and_a_json_task_file(folder):
    rows = [{"sentence": "good", "y": 1}, {"sentence": "bad", "y": "negative"}, {"sentence": "fine", "y": "1"}]
    for split in ("train", "dev", "test"):
        write(folder / f"{split}.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    config = merged(
        files={"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"},
        columns={"text_a": "sentence", "label": "y"},
    )
    spec = load_task_file(task_file(folder, config, "task.json"))
    assert [(e.text_a, e.label) for e in load_split(spec, "dev", 1)] == [("good", 1), ("bad", 0), ("fine", 1)]


def test_explicit_format_overrides_the_extension(folder):
    write(folder / "train.txt", TRAIN_CSV)
    spec = load_task_file(task_file(folder, merged(files={"train": "train.txt", "format": "csv"})))
    assert len(load_split(spec, "train", 0)) == 4
    message = error(load_task_file, task_file(folder, merged(files={"train": "train.txt"})))
    assert "train.txt: cannot tell the format from the extension '.txt'" in message


def test_headerless_csv_with_indices_and_label_values(folder):
    write(folder / "orig" / "train.csv", '"1","Slow service, cold food."\n"2","Loved it."\n')
    write(folder / "orig" / "dev.csv", '"2","Great."\n')
    write(folder / "orig" / "test.csv", '"1","Meh."\n"2","Yum."\n')
    config = merged(
        label_values=["1", "2"],
        files={"train": "orig/train.csv", "dev": "orig/dev.csv", "test": "orig/test.csv", "header": False},
        columns={"text_a": 1, "label": 0},
    )
    spec = load_task_file(task_file(folder, config))
    assert [(e.text_a, e.label) for e in load_split(spec, "train", 0)] == [("Slow service, cold food.", 0),
                                                                           ("Loved it.", 1)]  # fmt: skip
    write(folder / "orig" / "dev.csv", '"0","zero is not a value here"\n')
    message = error(load_task_file, folder / "task.toml")
    assert "orig/dev.csv:1: unknown label '0' in column 0; allowed: '1', '2'" in message


def test_seeded_paths(folder):
    for seed in (1, 2):
        write(folder / f"16-{seed}" / "train.csv", f"label,text\n0,neg {seed}\n1,pos {seed}\n")
        write(folder / f"16-{seed}" / "dev.csv", f"label,text\n1,dev {seed}\n")
    config = merged(seeds=[1, 2], files={"train": "16-{seed}/train.csv", "dev": "16-{seed}/dev.csv"})
    spec = load_task_file(task_file(folder, config))
    assert spec.seeds == (1, 2)
    assert [e.text_a for e in load_split(spec, "train", 2)] == ["neg 2", "pos 2"]
    assert load_task_data(spec, 1).dev == [Example(text_a="dev 1", label=1)]
    message = error(load_split, spec, "train", 3)
    assert "seed 3 has no split" in message and "[1, 2]" in message


def test_quick_test_size_and_full_test(folder):
    spec = load_task_file(task_file(folder, merged(quick_test_size=4)))
    quick = load_test(spec)
    assert len(quick) == 4 and Counter(e.label for e in quick) == {0: 2, 1: 2}
    assert quick == load_test(spec) == load_task_data(spec, 5).test
    assert len(load_test(spec, "full")) == 10 and len(load_test(spec, 6)) == 6


def test_user_task_from_arguments(folder):
    spec = user_task(
        "flags",
        train=folder / "train.csv",
        dev=folder / "dev.csv",
        test=folder / "test.csv",
        text_a="text",
        label="label",
        label_names=["negative", "positive"],
        label_words=[" bad", " great"],
        templates="{prompt} . {text_a} . It was {mask} .",  # {mask} not at the end: masked LMs only
        metric="f1",
    )
    assert set(spec.templates) == {"masked"} and spec.templates["masked"] == {
        "prefix": "{prompt} . {text_a} . It was {mask} ."
    }
    assert spec.metric == "f1" and spec.label_words["causal"] == (" bad", " great")
    with pytest.raises(TaskError, match="has no prefix template for causal LMs"):
        spec.template("causal")
    relative = user_task("flags2", train="train.csv", dev="dev.csv", test="test.csv", text_a="text",
                         label_names=["negative", "positive"], label_words=[" no", " yes"], base_dir=folder,
                         templates={"causal": "Review: {text_a}\n{prompt}Sentiment:{mask}"})  # fmt: skip
    assert relative.templates == {"causal": {"suffix": "Review: {text_a}\n{prompt}Sentiment:{mask}"}}
    placed = user_task("flags3", train="train.csv", dev="dev.csv", test="test.csv", text_a="text",
                       label_names=["negative", "positive"], label_words={"causal": [" no", " yes"]},
                       base_dir=folder, templates={"causal": {"prefix": "{prompt}R: {text_a}\nS:{mask}",
                                                              "suffix": "R: {text_a}\nS:{mask}"}})  # fmt: skip
    assert placed.templates["causal"] == {"prefix": "{prompt}R: {text_a}\nS:{mask}",
                                          "suffix": "R: {text_a}\n{prompt}S:{mask}"}  # fmt: skip
    assert "masked" not in placed.label_words


def test_settings_round_trip_through_a_json_task_file(folder, tmp_path_factory):
    write(folder / "pairs.jsonl", '{"a": "x", "b": "y", "l": 0}\n{"a": "z", "b": "w", "l": 1}\n')
    spec = user_task("pairs", train="pairs.jsonl", dev="pairs.jsonl", test="pairs.jsonl", text_a="a", text_b="b",
                     label="l", label_names=["same", "different"], label_words=[" Yes", " No"], base_dir=folder,
                     templates="{text_a}\n{text_b}\nSame?{mask}", quick_test_size=1)  # fmt: skip
    elsewhere = tmp_path_factory.mktemp("run") / "task.json"
    save_task_file(spec, elsewhere)
    again = load_task_file(elsewhere)
    assert again == spec and again.templates == spec.templates and again.quick_test_size == 1
    assert load_task_data(again, 0) == load_task_data(spec, 0)
    assert task_file_settings(again)["files"]["train"] == str((folder / "pairs.jsonl").resolve())
    with pytest.raises(TaskError, match="not a user task"):
        task_file_settings(TASKS["sst2"])


def test_resolve_task(folder):
    assert resolve_task("sst2") is TASKS["sst2"]
    assert resolve_task(str(task_file(folder))).name == "reviews"
    assert "no such task file" in error(resolve_task, str(folder / "missing.toml"))
    message = error(resolve_task, "yelp")
    assert "unknown task 'yelp'" in message and "task file" in message


def test_the_yelp_example_task_file(tmp_path):
    shutil.copy(REPO / "examples" / "yelp" / "task.toml", tmp_path / "task.toml")
    sample = REPO / "tests" / "client" / "data" / "yelp_sample.csv"
    for seed in (13, 21, 42, 87, 100):
        for split in ("train", "dev"):
            write(tmp_path / "data" / f"16-{seed}" / f"{split}.csv", sample.read_text())
    shutil.copy(sample, tmp_path / "data" / "test.csv")
    spec = load_task_file(tmp_path / "task.toml")
    assert spec.name == "yelp" and spec.quick_test_size == 1000 and spec.seeds == (13, 21, 42, 87, 100)
    assert spec.templates == TASKS["sst2"].templates and spec.label_words == TASKS["sst2"].label_words
    data = load_task_data(spec, 42)
    assert [e.label for e in data.train] == [1, 0, 0, 1, 0] and len(data.test) == 5
    assert data.train[4].text_a == 'Overpriced, noisy, and the "fresh" bread was stale.'


# ----------------------------------------------------------------------------------------- data errors


def test_missing_column_in_a_csv_header(folder):
    message = error(load_task_file, task_file(folder, merged(columns={"text_a": "review"})))
    assert re.search(r"train\.csv:1: no column 'review' for text_a in the header; available columns: 'label', "
                     r"'text'", message)  # fmt: skip


def test_missing_column_in_a_jsonl_row(folder):
    write(folder / "train.jsonl", '{"text": "a", "label": 0}\n{"txt": "b", "label": 1}\n')
    message = error(load_task_file, task_file(folder, merged(files={"train": "train.jsonl"})))
    assert "train.jsonl:2: no column 'text'; available columns: 'txt', 'label'" in message


def test_unknown_labels_name_the_value_and_the_allowed_ones(folder):
    write(folder / "dev.csv", "label,text\n1,fine\nneutral,hmm\n")
    message = error(load_task_file, task_file(folder))
    assert (
        "dev.csv:3: unknown label 'neutral' in column 'label'; allowed: 'negative', 'positive', or ids 0..1" in message
    )
    write(folder / "dev.csv", "label,text\n2,out of range\n")
    assert "dev.csv:2: unknown label '2'" in error(load_task_file, folder / "task.toml")
    write(folder / "dev.jsonl", '{"text": "x", "label": 1.0}\n')
    message = error(load_task_file, task_file(folder, merged(files={"dev": "dev.jsonl"})))
    assert "dev.jsonl:1: unknown label 1.0" in message


def test_a_class_without_training_examples(folder):
    write(folder / "train.csv", "label,text\nnegative,bad\n0,worse\n")
    message = error(load_task_file, task_file(folder))
    assert "train.csv: no training example of class 'positive'" in message


def test_empty_texts(folder):
    write(folder / "train.csv", 'label,text\n0,ok\n1,"   "\n')
    assert "train.csv:3: empty text in column 'text' (text_a)" in error(load_task_file, task_file(folder))
    write(folder / "train.jsonl", '{"text": "ok", "label": 0}\n{"text": null, "label": 1}\n')
    message = error(load_task_file, task_file(folder, merged(files={"train": "train.jsonl"})))
    assert "train.jsonl:2: empty text in column 'text'" in message
    write(folder / "train.jsonl", '{"text": "ok", "label": 0}\n{"text": 5, "label": 1}\n')
    assert "train.jsonl:2: column 'text' (text_a) must hold text" in error(load_task_file, folder / "task.toml")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("train.csv", "label,text\n0,ok\n1,too,many\n", "train.csv:3: malformed row: 3 fields, but the header has 2"),
        ("train.csv", 'label,text\n0,ok\n1,"ab"c\n', "train.csv:3: malformed CSV row (',' expected after '\"')"),
        ("train.csv", 'label,text\n0,ok\n1,"never closed\n0,x\n', "train.csv:3: malformed CSV row (unexpected end"),
        ("train.tsv", "label\ttext\n0\tok\n1\ta\tb\n", "train.tsv:3: malformed row: 3 fields, but the header has 2"),
        ("train.jsonl", '{"text": "ok", "label": 0}\n{"text": "b", "label": 1\n', "train.jsonl:2: malformed JSON"),
        ("train.jsonl", '{"text": "ok", "label": 0}\n["b", 1]\n', "train.jsonl:2: malformed row: expected a JSON"),
        ("train.csv", b"label,text\n0,ok\n1,caf\xe9\n", "train.csv:3: not UTF-8 text"),
    ],
)
def test_malformed_rows_name_the_file_and_line(folder, name, content, expected):
    write(folder / name, content)
    assert expected in error(load_task_file, task_file(folder, merged(files={"train": name})))


def test_missing_files(folder):
    message = error(load_task_file, task_file(folder, merged(files={"dev": "nope/dev.csv"})))
    assert "nope/dev.csv: dev file not found" in message
    write(folder / "test.csv", "label,text\n")
    assert "test.csv: the test file has no examples" in error(load_task_file, task_file(folder))


def test_headerless_index_beyond_the_row(folder):
    write(folder / "train.csv", "0,a\n1,b,extra\n1\n")
    config = merged(files={"header": False, "dev": "train.csv", "test": "train.csv"}, columns={"text_a": 1, "label": 0})
    assert "train.csv:3: malformed row: 1 fields, but column index 1 is used" in error(
        load_task_file, task_file(folder, config)
    )


# ----------------------------------------------------------------------------------------- setting errors


def check_setting_error(folder: Path, config: dict, needle: str, expected: str, name: str = "task.toml") -> None:
    path = task_file(folder, config, name)
    message = error(load_task_file, path)
    assert f"{path}:{line_of(path, needle)}: " in message, message
    assert expected in message, message


def test_templates_without_text_slots_or_mask(folder):
    for template, expected in [
        ("{prompt}Sentiment:{mask}", "must contain {text_a}"),
        ("Review: {text_a}\nSentiment:", "must contain {mask} exactly once"),
        ("Review: {text_a} {mask} .", "for causal LMs {mask} must end the template"),
        ("{text_a} {text_b}:{mask}", "uses {text_b}, but the examples have only text_a"),
        ("Review: {text_a} {unknown}:{mask}", "unknown slot {unknown}"),
    ]:
        config = merged(templates={"masked": "{text_a} . It was {mask} .", "causal": template})
        check_setting_error(folder, config, f"causal = {json.dumps(template)}", expected)
    bad_suffix = {"causal": {"suffix": "{prompt}Review: {text_a}\nSentiment:{mask}"}}
    check_setting_error(folder, merged(templates=bad_suffix, label_words=[" a", " b"]), "suffix =",
                        "a suffix template needs {prompt} after every text slot")  # fmt: skip
    check_setting_error(folder, merged(templates={"decoder": "{text_a}:{mask}"}), "[templates]", "unknown family")
    no_words = merged(label_words={"causal": [" no", " yes"]})
    check_setting_error(folder, no_words, 'masked = "{text_a}', "a masked template, but no masked label words")


def test_pair_columns_need_a_text_b_slot(folder):
    write(folder / "train.csv", "label,a,b\n0,x,y\n1,z,w\n")
    config = merged(files={"dev": "train.csv", "test": "train.csv"}, columns={"text_a": "a", "text_b": "b"})
    check_setting_error(folder, config, 'causal = "Review', "it has no {text_b} slot, but the examples have a text_b")


def test_label_settings(folder):
    check_setting_error(folder, merged(label_words=[" a", " b", " c"]), "label_words =",
                        "3 masked label words [' a', ' b', ' c'] for 2 classes")  # fmt: skip
    check_setting_error(folder, merged(label_words=[" a", " a"]), "label_words =", "distinct and non-empty")
    check_setting_error(folder, merged(label_names=["only"]), "label_names =", "needs 2 to")
    check_setting_error(folder, merged(label_names=["a", "a"]), "label_names =", "repeat a name")
    check_setting_error(folder, merged(label_values=["1"]), "label_values =", "one distinct value per class")
    check_setting_error(folder, merged(metric="f2"), "metric =", "unknown metric 'f2'")


def test_task_file_structure_errors(folder):
    check_setting_error(folder, merged(labels=["a", "b"]), "labels =", "unknown key 'labels' in the task file")
    check_setting_error(folder, merged(files={"validation": "dev.csv"}), "validation =", "unknown key 'validation'")
    check_setting_error(folder, merged(name="sst2"), "name =", "'sst2' is a shipped task")
    check_setting_error(folder, merged(name="my task"), "name =", "must be 1-64 letters")
    check_setting_error(folder, merged(files={"test": "{seed}/test.csv"}), "test =", "must not depend on {seed}")
    check_setting_error(folder, merged(files={"train": "{seed}/train.csv"}), "[files]", "list the seeds")
    check_setting_error(folder, merged(seeds=[1]), "seeds =", "no {seed} to fill in")
    check_setting_error(folder, merged(quick_test_size=0), "quick_test_size =", "positive integer")
    check_setting_error(folder, merged(files={"format": "xlsx"}), "format =", "unknown format 'xlsx'")
    check_setting_error(folder, merged(columns={"text_a": 3}), "text_a =", "must be a column name")
    check_setting_error(folder, merged(metric="f2"), '"metric"', "unknown metric 'f2'", name="task.json")
    assert "missing 'templates'" in error(load_task_file, task_file(folder, merged(templates=None)))
    assert "missing the [columns] table" in error(load_task_file, task_file(folder, merged(columns=None)))
    write(folder / "broken.toml", 'name = "x"\nlabel_names = [\n')
    assert "broken.toml: not valid TOML" in error(load_task_file, folder / "broken.toml")
    write(folder / "broken.json", '{\n  "name": "x",\n}\n')
    assert "broken.json:3: not valid JSON" in error(load_task_file, folder / "broken.json")
    assert "a task file ends in .toml or .json" in error(load_task_file, write(folder / "task.yaml", "name: x\n"))


def test_setting_errors_without_a_task_file_name_the_task(folder):
    message = error(user_task, "direct", train=folder / "train.csv", dev=folder / "dev.csv", test=folder / "test.csv",
                    text_a="text", label_names=["negative", "positive"], label_words=[" a"], templates="{text_a}:{mask}")  # fmt: skip
    assert message.startswith("task 'direct': 1 masked label words")
