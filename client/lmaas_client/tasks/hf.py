"""Tasks from Hugging Face `datasets` (the optional `hf` extra: ``pip install 'lmaas-client[hf]'``).

A dataset on the Hub (name, optional config and revision) or a folder written by `DatasetDict.save_to_disk`
becomes a user task, as CSV files do with a task file: the same settings (label names, label words,
templates, metric, ...), given as a task file's ``[dataset]`` table instead of ``[files]``, as
``lmaas tune --task hf:NAME[:CONFIG]`` (or ``hf:FOLDER``) with the user-task flags, or to `hf_task`.
`datasets` is imported only when such a task is built, never by importing this module.

Few-shot splits are drawn, not read: for a seed s, ``random.Random(s)`` samples 2k examples of each class
(class ids in order, the rng running on from class to class) from the train split without replacement;
the first k of each class are the training examples, the next k the dev examples, listed class by class.
That is the recipe of ``examples/yelp/README.md``, so a dataset used here and the CSV files that recipe
writes from it give the very same splits (k = `shots`, 16 by default, as the shipped tasks). Every seed
draws its own split. The test split is used whole (a task's `quick_test_size` subsample applies as usual).

Columns: text columns must hold strings. The label column may be a ClassLabel (its names are the label
names; `label_names` may rename them, one per class), integers (class ids 0..n-1) or strings (class names,
or digits of ids); the last two need `label_names`, and `label_values` maps other values as for files.
Anything else, a missing column, a class with fewer than 2k training examples, an unlabelled row (-1) or
an empty text is an error naming the dataset, split, row and column, raised before any call is spent.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmaas_client.tasks.readers import LabelReader, text_value
from lmaas_client.tasks.settings import SettingError, positive_int, task_parts
from lmaas_client.tasks.spec import Split, TaskError, TaskSpec
from lmaas_client.tasks.templates import LabelWordsArg, TemplatesArg
from lmaas_protocol import Example

HF_PREFIX = "hf:"
DEFAULT_SHOTS = 16
DATASET_KEYS = {"name", "path", "config", "revision", "train", "test", "shots"}
INSTALL_HINT = "tasks from Hugging Face datasets need the `hf` extra: pip install 'lmaas-client[hf]'"


@dataclass(frozen=True)
class DatasetRef:
    """Where a dataset task's examples come from: a Hub `name` or a `path` saved with save_to_disk."""

    name: str | None = None
    path: str | None = None  # absolute, or relative to the task's base folder
    config: str | None = None
    revision: str | None = None
    train: str = "train"  # the split the few-shot train and dev examples are drawn from
    test: str = "test"  # the split scored as the test set, whole
    shots: int = DEFAULT_SHOTS  # examples per class in train, and again in dev

    def describe(self) -> str:
        if self.path is not None:
            return f"dataset {self.path}"
        return f"dataset {self.name}" + (f" ({self.config})" if self.config else "")

    def settings(self) -> dict[str, Any]:
        """The task file's [dataset] table (unset keys left out)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def parse_hf_task(value: str) -> tuple[str, DatasetRef]:
    """``hf:NAME[:CONFIG]`` (a Hub dataset) or ``hf:FOLDER`` (an existing folder written by save_to_disk)
    -> (a task name, the reference); the name is "hf-" and the dataset's last path part (and config)."""
    rest = value.removeprefix(HF_PREFIX)
    if not rest:
        raise TaskError(f"{value!r}: name a dataset after 'hf:', e.g. hf:fancyzhx/yelp_polarity or hf:glue:sst2")
    folder = Path(rest).expanduser()
    if folder.is_dir():
        ref = DatasetRef(path=str(folder.resolve()))
        base = folder.resolve().name
    else:
        name, _, config = rest.partition(":")
        ref = DatasetRef(name=name, config=config or None)
        base = name.rstrip("/").split("/")[-1] + (f".{config}" if config else "")
    return "hf-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "dataset")[:61], ref


# Over 60 lines: one check per setting, each naming it; the reading is in DatasetSplits.
def hf_task(
    name: str,
    *,
    templates: TemplatesArg,
    label_words: LabelWordsArg,
    dataset: str | None = None,
    path: str | Path | None = None,
    config: str | None = None,
    revision: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    shots: int = DEFAULT_SHOTS,
    text_a: str = "text",
    text_b: str | None = None,
    label: str = "label",
    label_names: Sequence[str] | None = None,
    label_values: Sequence[str] | None = None,
    metric: str = "accuracy",
    description: str = "",
    quick_test_size: int | None = None,
    instruction: str | None = None,
    base_dir: str | Path | None = None,
    source: str | None = None,
) -> TaskSpec:
    """A user task from a Hub dataset (`dataset`, `config`, `revision`) or a saved one (`path`, relative to
    `base_dir`). Opens the splits and checks columns, labels and class sizes now (see the module docstring)."""
    where = source or f"task {name!r}"

    def bad(key: str, detail: str) -> SettingError:
        return SettingError(where, key, detail)

    if (dataset is None) == (path is None):
        raise bad("dataset", "give a Hub dataset name or a path saved with save_to_disk (exactly one)")
    for key, value in (("dataset.name", dataset), ("dataset.config", config), ("dataset.revision", revision),
                       ("dataset.train", train_split), ("dataset.test", test_split)):  # fmt: skip
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise bad(key, f"'{key.split('.')[1]}' must be a non-empty string, got {value!r}")
    if isinstance(path, (str, Path)) and not str(path).strip():
        raise bad("dataset.path", "'path' must be a folder written by save_to_disk")
    if not positive_int(shots):
        raise bad("dataset.shots", f"shots (examples per class in train and in dev) must be a positive integer, "
                                   f"got {shots!r}")  # fmt: skip
    columns = {"text_a": text_a, "label": label} | ({"text_b": text_b} if text_b is not None else {})
    for role, column in columns.items():
        if not (isinstance(column, str) and column.strip()):
            raise bad(f"columns.{role}", f"column {role} must be a column name, got {column!r}")
    if path is not None:
        path = Path(base_dir or Path.cwd()) / Path(path).expanduser()
    ref = DatasetRef(dataset, None if path is None else str(path.resolve()), config, revision, train_split,
                     test_split, shots)  # fmt: skip
    loader = DatasetSplits(ref, columns, where)
    names = loader.open(label_names, bad)
    parts = task_parts(name, names, label_values, templates, label_words, text_b is not None, metric,
                       quick_test_size, bad)  # fmt: skip
    loader.labels = LabelReader(parts.names, parts.values, label)
    loader.check_all()
    return parts.spec(name, loader, metric, description, quick_test_size, None, instruction, source)


class DatasetSplits:
    """The loader of a dataset task: opens the splits once, draws train/dev per seed, caches what it read."""

    def __init__(self, ref: DatasetRef, columns: dict[str, str], where: str):
        self.ref = ref
        self.columns = columns
        self.where = where
        self.labels: LabelReader | None = None  # set once the label names are known
        self._saved: Any = None  # the DatasetDict of a saved dataset
        self._splits: dict[str, Any] = {}
        self._train_labels: list[int] | None = None
        self._test: list[Example] | None = None
        self._drawn: dict[int, tuple[list[Example], list[Example]]] = {}

    def __call__(self, split: Split, seed: int) -> list[Example]:
        if split == "test":
            return list(self.test_examples())
        if seed not in self._drawn:
            train, dev = few_shot(self.train_labels(), len(self.labels.names), self.ref.shots, seed)  # type: ignore[union-attr]
            self._drawn[seed] = (self._examples(self.ref.train, train), self._examples(self.ref.train, dev))
        return list(self._drawn[seed][0 if split == "train" else 1])

    # ------------------------------------------------------------------------------------------ opening

    def open(self, label_names: Sequence[str] | None, bad) -> Sequence[str]:
        """Open both splits, check every column's type; the label names (a ClassLabel's unless given)."""
        datasets = import_datasets()
        for split in dict.fromkeys((self.ref.train, self.ref.test)):
            self._splits[split] = self._load(datasets, split)
        kinds = {split: self._check_columns(datasets, split, bad) for split in self._splits}
        found = kinds[self.ref.train]
        if found is None:  # integers or strings: the names must be given
            if label_names is None:
                raise bad("label_names", f"{self.ref.describe()}: column {self.columns['label']!r} holds plain "
                                         f"values, not a ClassLabel: give label_names (the classes, in id order)")  # fmt: skip
            return label_names
        test_names = kinds[self.ref.test]
        if test_names is not None and list(test_names) != list(found):
            raise bad("columns.label", f"{self.ref.describe()}: the ClassLabel of column {self.columns['label']!r} "
                                       f"names {list(found)} in split {self.ref.train!r} but {list(test_names)} in "
                                       f"{self.ref.test!r}")  # fmt: skip
        if label_names is not None and (isinstance(label_names, str) or len(label_names) != len(found)):
            raise bad("label_names", f"label_names rename the {len(found)} classes of the ClassLabel column "
                                     f"{self.columns['label']!r} {list(found)}: give {len(found)} names, got "
                                     f"{label_names!r}")  # fmt: skip
        return label_names if label_names is not None else list(found)

    def _load(self, datasets: Any, split: str) -> Any:
        ref = self.ref
        if ref.path is not None:
            if not Path(ref.path).is_dir():
                raise TaskError(f"{self.where}: {ref.path}: no such folder (a dataset saved with save_to_disk)")
            if self._saved is None:
                self._saved = datasets.load_from_disk(ref.path)
            saved = self._saved
            if not isinstance(saved, datasets.DatasetDict):
                raise TaskError(f"{self.where}: {ref.path} holds a single split; save a DatasetDict with the splits "
                                f"{ref.train!r} and {ref.test!r}")  # fmt: skip
            if split not in saved:
                raise TaskError(f"{self.where}: {ref.describe()} has no split {split!r}; splits: {', '.join(saved)}")
            return saved[split]
        try:
            return datasets.load_dataset(ref.name, ref.config, split=split, revision=ref.revision)
        except Exception as exc:  # the library's own errors (not found, no such config or split, offline, ...)
            raise TaskError(f"{self.where}: cannot load split {split!r} of {ref.describe()}: "
                            f"{type(exc).__name__}: {exc}") from None  # fmt: skip

    def _check_columns(self, datasets: Any, split: str, bad) -> list[str] | None:
        """Check the columns of one split; the label names of a ClassLabel label column, else None."""
        features = self._splits[split].features
        for role, column in self.columns.items():
            if column not in features:
                available = ", ".join(repr(c) for c in features)
                raise bad(f"columns.{role}", f"{self.ref.describe()}, split {split!r}: no column {column!r} for "
                                             f"{role}; available columns: {available}")  # fmt: skip
            feature = features[column]
            dtype = getattr(feature, "dtype", None) if isinstance(feature, datasets.Value) else None
            if role != "label" and dtype not in ("string", "large_string"):
                raise bad(f"columns.{role}", f"{self.ref.describe()}, split {split!r}: column {column!r} ({role}) "
                                             f"must hold text, but holds {feature}")  # fmt: skip
            if role == "label" and not isinstance(feature, datasets.ClassLabel) and not _int_or_str(dtype):
                raise bad("columns.label", f"{self.ref.describe()}, split {split!r}: label column {column!r} holds "
                                           f"{feature}; a label column must be a ClassLabel, integers or strings")  # fmt: skip
        label = features[self.columns["label"]]
        return list(label.names) if isinstance(label, datasets.ClassLabel) else None

    # ------------------------------------------------------------------------------------------ reading

    def check_all(self) -> None:
        """Every training label and class size, and the whole test split (the drawn rows' texts: per seed)."""
        counts = [0] * len(self.labels.names)  # type: ignore[union-attr]
        for label in self.train_labels():
            counts[label] += 1
        need = 2 * self.ref.shots
        for index, count in enumerate(counts):
            if count < need:
                raise TaskError(f"{self.where}: {self.ref.describe()}, split {self.ref.train!r}: class "
                                f"{self.labels.names[index]!r} has {count} examples; shots = {self.ref.shots} "  # type: ignore[union-attr]
                                f"draws {need} of each class ({self.ref.shots} train + {self.ref.shots} dev)")  # fmt: skip
        self.test_examples()

    def train_labels(self) -> list[int]:
        if self._train_labels is None:
            column = self.columns["label"]
            values = list(self._splits[self.ref.train][column])
            self._train_labels = [self._label(v, self.ref.train, i) for i, v in enumerate(values)]
        return self._train_labels

    def test_examples(self) -> list[Example]:
        if self._test is None:
            self._test = self._examples(self.ref.test, None)
            if not self._test:
                raise TaskError(f"{self.where}: {self.ref.describe()}: split {self.ref.test!r} has no examples")
        return self._test

    def _examples(self, split: str, rows: list[int] | None) -> list[Example]:
        """Examples of `rows` of a split (None: all), in that order; every text and label checked."""
        data = self._splits[split]
        table = (data if rows is None else data.select(rows)).select_columns(list(self.columns.values())).to_dict()
        indices = rows if rows is not None else range(len(data))
        examples = []
        for position, index in enumerate(indices):
            where = f"{self.where}: {self.ref.describe()}, split {split!r}, row {index}"
            fields: dict[str, Any] = {
                role: text_value(table[column][position], column, role, where)
                for role, column in self.columns.items()
                if role != "label"
            }
            fields["label"] = self._label(table[self.columns["label"]][position], split, index)
            examples.append(Example(**fields))
        return examples

    def _label(self, raw: Any, split: str, index: int) -> int:
        where = f"{self.where}: {self.ref.describe()}, split {split!r}, row {index}"
        if raw == -1 and self.labels.values is None:  # type: ignore[union-attr]
            raise TaskError(f"{where}: no label (-1 in column {self.columns['label']!r}); an unlabelled split? "
                            f"give a labelled one as the test split (e.g. test = \"validation\")")  # fmt: skip
        return self.labels.id(raw, where)  # type: ignore[union-attr]

    def settings(self) -> dict[str, Any]:
        return {"dataset": self.ref.settings(), "columns": dict(self.columns)}


def few_shot(labels: Sequence[int], classes: int, shots: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of the train and dev examples drawn for `seed` (see the module docstring)."""
    by_class: list[list[int]] = [[] for _ in range(classes)]
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(seed)
    train: list[int] = []
    dev: list[int] = []
    for members in by_class:
        picked = rng.sample(members, 2 * shots)
        train += picked[:shots]
        dev += picked[shots:]
    return train, dev


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise TaskError(INSTALL_HINT) from None
    return datasets


def _int_or_str(dtype: str | None) -> bool:
    return dtype is not None and (dtype in ("string", "large_string") or re.fullmatch(r"u?int\d+", dtype) is not None)
