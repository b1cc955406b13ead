"""User-defined tasks: your own CSV, TSV or JSONL files, with a template and label words.

Two ways in, one result (a `TaskSpec` whose `loader` reads the files, so `data.load_split`,
`data.load_test` and `data.load_task_data` treat it like a shipped task):

- `user_task(...)`: everything as arguments (what the CLI's flags map to);
- `load_task_file(path)`: a small TOML (stdlib `tomllib`) or JSON task file; paths in it are relative to
  the task file. `resolve_task(value)` takes a shipped task's name or a task file's path.

Every file is read and checked when the task is built, before any call is spent: errors name the file and
line (missing columns with the available ones, unknown labels with the allowed ones, empty texts,
malformed rows, classes without a training example, bad templates).

A task file (TOML; JSON has the same structure)::

    name = "yelp"                       # letters, digits, - _ . (not a shipped task's name)
    description = "Yelp polarity"       # optional
    metric = "accuracy"                 # or "f1" (2 classes: F1 of the second class, id 1)
    label_names = ["negative", "positive"]     # the classes, in order (class id = position)
    label_values = ["1", "2"]           # optional: what the label column holds per class, in order
    quick_test_size = 1000              # optional: default test subsample (stratified, fixed seed)
    seeds = [13, 21, 42, 87, 100]       # only when train/dev paths contain {seed}

    [files]
    train = "data/16-{seed}/train.csv"  # {seed}: one few-shot split per seed; else one fixed split
    dev = "data/16-{seed}/dev.csv"
    test = "data/test.csv"              # one test set for all seeds (no {seed})
    format = "csv"                      # optional: csv, tsv or jsonl; default from each extension
    header = true                       # csv/tsv: false = no header row, columns are 0-based indices

    [columns]
    text_a = "text"                     # the text (or first sentence of a pair)
    text_b = "hypothesis"               # optional: second sentence of a pair
    label = "label"

    label_words = [" bad", " great"]    # one list for both families, or a table:
    # [label_words]  masked = [" bad", " great"]  causal = [" negative", " positive"]

    [templates]                         # one string for all families, or one per family, or per placement:
    masked = "{prompt} . {text_a} . It was {mask} ."
    causal = "Review: {text_a}\\nSentiment:{mask}"
    # [templates.causal]  prefix = "{prompt}Review: ..."  suffix = "Review: {text_a}\\n{prompt}Sentiment:{mask}"

Labels: the label column holds, per row, a class name from `label_names` or a class id 0..n-1 (an integer,
or its digits in CSV/TSV); names win when a name is itself digits. With `label_values` it must hold one
of those values instead (e.g. Yelp's original CSV: "1" = negative, "2" = positive).

Templates and {prompt}: a template written with {prompt} is used as written, for the placement it fits
("suffix" when {prompt} follows every text slot, else "prefix"). A template written without {prompt} gets
both placements: prefix puts {prompt} at the very start; suffix puts it right after the last line break
that follows the last text slot (the start of the answer-cue line, e.g. ``Review: {text_a}\\n{prompt}
Sentiment:{mask}``), or right after the last text slot when no line break follows it. One template for all
families is used for causal LMs only when it ends with {mask}. Label words should carry their leading
space (" great"); the verbalizer uses each word's first sub-token.

A Hugging Face dataset instead of files: a ``[dataset]`` table in place of ``[files]`` (no ``seeds``;
``label_names`` optional when the label column is a ClassLabel)::

    [dataset]
    name = "fancyzhx/yelp_polarity"     # a Hub dataset; or path = "saved/" (save_to_disk, relative to this file)
    config = "plain_text"               # optional, and so are: revision, train = "train", test = "test"
    shots = 16                          # examples per class drawn for train, and again for dev, per seed

Reading the example files: `readers`; datasets: `hf`; the shared settings: `settings`; label words and
templates per family: `templates`.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmaas_client.tasks.file_lines import key_line
from lmaas_client.tasks.hf import DATASET_KEYS, DEFAULT_SHOTS, DatasetSplits, hf_task
from lmaas_client.tasks.readers import FORMATS, Column, FileSplits, decode_text
from lmaas_client.tasks.registry import TASKS, get_task
from lmaas_client.tasks.settings import SettingError, check_seeds, is_index, task_parts
from lmaas_client.tasks.spec import TaskError, TaskSpec
from lmaas_client.tasks.templates import LabelWordsArg, TemplatesArg

TASK_FILE_SUFFIXES = (".toml", ".json")

# ----------------------------------------------------------------------------------------- building a task


def user_task(
    name: str,
    *,
    train: str | Path,
    dev: str | Path,
    test: str | Path,
    label_names: Sequence[str],
    templates: TemplatesArg,
    label_words: LabelWordsArg,
    text_a: Column = "text_a",
    text_b: Column | None = None,
    label: Column = "label",
    label_values: Sequence[str] | None = None,
    format: str | None = None,
    header: bool = True,
    metric: str = "accuracy",
    description: str = "",
    quick_test_size: int | None = None,
    seeds: Sequence[int] | None = None,
    instruction: str | None = None,
    base_dir: str | Path | None = None,
    source: str | None = None,
) -> TaskSpec:
    """A user task from files and settings given directly (the CLI's flags). Reads and checks every file.

    Paths are relative to `base_dir` (default: the working directory); train/dev paths may contain
    ``{seed}`` (then `seeds` lists the splits). `source` (e.g. the task file) prefixes setting errors and is
    kept on the TaskSpec. See the module docstring for labels and templates.
    """
    where = source or f"task {name!r}"

    def bad(key: str, detail: str) -> SettingError:
        return SettingError(where, key, detail)

    parts = task_parts(name, label_names, label_values, templates, label_words, text_b is not None, metric,
                       quick_test_size, bad)  # fmt: skip
    if format is not None and format not in FORMATS:
        raise bad("files.format", f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(header, bool):
        raise bad("files.header", f"header must be true or false, got {header!r}")
    columns: dict[str, Column] = {"text_a": text_a, "label": label}
    if text_b is not None:
        columns["text_b"] = text_b
    for role, column in columns.items():
        if header and not (isinstance(column, str) and column.strip()):
            raise bad(f"columns.{role}", f"column {role} must be a column name, got {column!r}")
        if not header and not is_index(column):
            raise bad(
                f"columns.{role}", f"column {role} must be a 0-based column index (header = false), got {column!r}"
            )

    paths = {"train": str(train), "dev": str(dev), "test": str(test)}
    if "{seed}" in paths["test"]:
        raise bad("files.test", "the test file must not depend on {seed} (one test set for every run)")
    seeded = "{seed}" in paths["train"] or "{seed}" in paths["dev"]
    check_seeds(seeds, bad)
    if seeded and not seeds:
        raise bad("files", "train/dev paths contain {seed}: list the seeds (e.g. seeds = [13, 21, 42, 87, 100])")
    if seeds and not seeded:
        raise bad("seeds", "seeds are given, but the train/dev paths have no {seed} to fill in")

    loader = FileSplits(
        base=Path(base_dir) if base_dir is not None else Path.cwd(),
        paths=paths,
        format=format,
        header=header,
        columns=columns,
        label_names=parts.names,
        label_values=parts.values,
        seeds=tuple(seeds or ()),
    )
    loader.check_all()
    return parts.spec(name, loader, metric, description, quick_test_size, seeds, instruction, source)


TOP_KEYS = {"name", "description", "instruction", "metric", "label_names", "label_values", "quick_test_size", "seeds", "files",
            "dataset", "columns", "label_words", "templates"}  # fmt: skip
FILE_KEYS = {"train", "dev", "test", "format", "header"}
COLUMN_KEYS = {"text_a", "text_b", "label"}


# Over 60 lines: maps each key of the file to user_task (or hf_task) with errors pointing at the key's line.
def load_task_file(path: str | Path) -> TaskSpec:
    """A user task from a TOML or JSON task file (see the module docstring); files are relative to it."""
    path = Path(path)
    config, text = _read_task_file(path)

    def at(key: str) -> str:
        return f"{path}:{line}" if (line := key_line(text, key)) else str(path)

    def table(key: str, allowed: set[str]) -> dict[str, Any]:
        value = config.get(key)
        if value is None:
            raise TaskError(f"{path}: missing the [{key}] table (keys: {', '.join(sorted(allowed))})")
        if not isinstance(value, dict):
            raise TaskError(f"{at(key)}: '{key}' must be a table (TOML [{key}], JSON object)")
        _no_unknown(value, allowed, f"[{key}]", lambda name: at(f"{key}.{name}"))
        return value

    _no_unknown(config, TOP_KEYS, "the task file", at)
    from_dataset = "dataset" in config
    if from_dataset and "files" in config:
        raise TaskError(f"{at('dataset')}: a task reads [files] or a [dataset], not both")
    for key in ("name", "label_words", "templates") + (() if from_dataset else ("label_names",)):
        if key not in config:
            raise TaskError(f"{path}: missing '{key}' (required: name, label_names (optional for a [dataset] with a "
                            f"ClassLabel column), [files] or [dataset], [columns], label_words, templates)")  # fmt: skip
    columns = table("columns", COLUMN_KEYS)
    for key in ("text_a", "label"):
        if key not in columns:
            raise TaskError(f"{at('columns')}: [columns] needs '{key}'")
    for key in ("description", "metric", "instruction"):
        if key in config and not isinstance(config[key], str):
            raise TaskError(f"{at(key)}: '{key}' must be a string")
    common = dict(text_a=columns["text_a"], text_b=columns.get("text_b"), label=columns["label"],
                  label_names=config.get("label_names"), label_values=config.get("label_values"),
                  templates=config["templates"], label_words=config["label_words"],
                  metric=config.get("metric", "accuracy"), description=config.get("description", ""),
                  quick_test_size=config.get("quick_test_size"), instruction=config.get("instruction"),
                  base_dir=path.resolve().parent, source=str(path))  # fmt: skip
    try:
        if from_dataset:
            if "seeds" in config:
                raise TaskError(f"{at('seeds')}: a [dataset] task draws its few-shot split for any seed; drop 'seeds'")
            dataset = table("dataset", DATASET_KEYS)
            return hf_task(config["name"], dataset=dataset.get("name"), path=dataset.get("path"),
                           config=dataset.get("config"), revision=dataset.get("revision"),
                           train_split=dataset.get("train", "train"), test_split=dataset.get("test", "test"),
                           shots=dataset.get("shots", DEFAULT_SHOTS), **common)  # fmt: skip
        files = table("files", FILE_KEYS)
        for key in ("train", "dev", "test"):
            if not isinstance(files.get(key), str):
                raise TaskError(f"{at('files')}: [files] needs '{key}' (a path relative to the task file)")
        return user_task(config["name"], train=files["train"], dev=files["dev"], test=files["test"],
                         format=files.get("format"), header=files.get("header", True), seeds=config.get("seeds"),
                         **common)  # fmt: skip
    except SettingError as exc:
        raise TaskError(f"{at(exc.key)}: {exc.detail}") from None


def _read_task_file(path: Path) -> tuple[Any, str]:
    """The parsed settings of a TOML or JSON task file, and its text (to point errors at lines)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the task file ({exc.strerror or exc})") from None
    text = decode_text(raw, path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    elif suffix == ".toml":
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TaskError(f"{path}: not valid TOML ({exc})") from None
    else:
        raise TaskError(f"{path}: a task file ends in .toml or .json")
    if not isinstance(config, dict):
        raise TaskError(f"{path}: the task file must hold a table (JSON: an object) of settings")
    return config, text


def task_file_settings(task: TaskSpec) -> dict[str, Any]:
    """A user task as task-file settings (JSON-able, absolute paths, templates expanded per placement).

    A run can write them next to its results (`save_task_file`) so that a task given by flags can be
    resumed or re-scored later with `load_task_file`, exactly as it was.
    """
    loader = task.loader
    if isinstance(loader, DatasetSplits):
        source = loader.settings()
    elif isinstance(loader, FileSplits):
        files = {split: str(loader.base.resolve() / path) for split, path in loader.paths.items()}
        source = {"files": files | {"header": loader.header} | ({"format": loader.format} if loader.format else {}),
                  "columns": dict(loader.columns)}  # fmt: skip
    else:
        raise TaskError(f"task {task.name} is not a user task read from files or a dataset")
    settings: dict[str, Any] = {
        "name": task.name,
        "description": task.description,
        "metric": task.metric,
        "label_names": list(task.label_names),
        **source,
        "label_words": {family: list(words) for family, words in task.label_words.items()},
        "templates": {family: dict(by_placement) for family, by_placement in task.templates.items()},
    }
    values = loader.labels.values if isinstance(loader, DatasetSplits) else loader.label_values  # type: ignore[union-attr]
    if values is not None:
        settings["label_values"] = list(values)
    if task.quick_test_size is not None:
        settings["quick_test_size"] = task.quick_test_size
    if task.instruction:
        settings["instruction"] = task.instruction
    if task.seeds:
        settings["seeds"] = list(task.seeds)
    return settings


def save_task_file(task: TaskSpec, path: str | Path) -> Path:
    """Write a user task as a JSON task file (see `task_file_settings`); returns the path."""
    path = Path(path)
    path.write_text(json.dumps(task_file_settings(task), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def is_task_file(value: str | Path) -> bool:
    return Path(value).suffix.lower() in TASK_FILE_SUFFIXES


def resolve_task(value: str | Path) -> TaskSpec:
    """A shipped task by name, or a user task from a task file path (ending in .toml or .json)."""
    if isinstance(value, str) and value in TASKS:
        return TASKS[value]
    if is_task_file(value):
        if not Path(value).is_file():
            raise TaskError(f"{value}: no such task file")
        return load_task_file(value)
    try:
        return get_task(str(value))
    except TaskError as exc:
        raise TaskError(f"{exc}; or give a task file (.toml or .json)") from None


# ----------------------------------------------------------------------------------------- settings


def _no_unknown(mapping: dict[str, Any], allowed: set[str], scope: str, at) -> None:
    for key in mapping:
        if key not in allowed:
            raise TaskError(f"{at(key)}: unknown key '{key}' in {scope}; allowed: {', '.join(sorted(allowed))}")
