"""Reading a user task's example files (CSV, TSV, JSONL) into `Example`s, with errors that name the file and line.

CSV is read with Python's csv module (RFC 4180 quoting, UTF-8, an optional BOM); TSV is split on tabs with
no quoting (as GLUE's files), so fields cannot hold tabs or line breaks; JSONL is one JSON object per line.
Texts are trimmed at both ends; blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmaas_client.tasks.spec import Split, TaskError
from lmaas_protocol import Example
from lmaas_protocol.schemas import MAX_TEXT_CHARS

FORMATS = ("csv", "tsv", "jsonl")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
Column = str | int
SPLITS: tuple[Split, ...] = ("train", "dev", "test")


def decode_text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TaskError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None


# ----------------------------------------------------------------------------------------- reading files


class FileSplits:
    """The loader of a user task: reads, checks and caches its files; called as loader(split, seed)."""

    def __init__(self, *, base: Path, paths: dict[str, str], format: str | None, header: bool,
                 columns: dict[str, Column], label_names: list[str], label_values: list[str] | None,
                 seeds: tuple[int, ...]):  # fmt: skip
        self.base = base
        self.paths = paths
        self.format = format
        self.header = header
        self.columns = columns
        self.label_names = label_names
        self.label_values = label_values
        self.seeds = seeds
        self._cache: dict[Path, list[Example]] = {}

    def __call__(self, split: Split, seed: int) -> list[Example]:
        return list(self._read(self.path(split, seed), split))

    def path(self, split: Split, seed: int) -> Path:
        template = self.paths[split]
        if "{seed}" in template:
            if seed not in self.seeds:
                raise TaskError(f"seed {seed} has no split in {template}; available seeds: {list(self.seeds)}")
            template = template.replace("{seed}", str(seed))
        return self.base / template

    def check_all(self) -> None:
        for seed in self.seeds or (0,):
            for split in SPLITS:
                self._read(self.path(split, seed), split)

    def _read(self, path: Path, split: Split) -> list[Example]:
        if path not in self._cache:
            examples = read_examples(path, self.format, self.header, self.columns, self.label_names,
                                     self.label_values, split)  # fmt: skip
            if split == "train":
                present = {e.label for e in examples}
                empty = [name for i, name in enumerate(self.label_names) if i not in present]
                if empty:
                    raise TaskError(f"{path}: no training example of class {empty[0]!r} (classes without "
                                    f"examples: {', '.join(empty)}); every class needs at least one")  # fmt: skip
            self._cache[path] = examples
        return self._cache[path]


def file_format(path: Path, format: str | None) -> str:
    if format is not None:
        return format
    try:
        return EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise TaskError(f"{path}: cannot tell the format from the extension {path.suffix!r}; name it "
                        f"(format = csv, tsv or jsonl)") from None  # fmt: skip


def read_examples(
    path: str | Path,
    format: str | None,
    header: bool,
    columns: Mapping[str, Column],
    label_names: Sequence[str],
    label_values: Sequence[str] | None = None,
    split: str = "",
) -> list[Example]:
    """Examples from one CSV/TSV/JSONL file; `columns` maps text_a/text_b/label to column names (or indices)."""
    path = Path(path)
    fmt = file_format(path, format)
    what = f"{split} file" if split else "file"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TaskError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    text = decode_text(raw, path)
    labels = LabelReader(label_names, label_values, columns["label"])
    rows = _jsonl_rows(text, path) if fmt == "jsonl" else _delimited_rows(text, path, fmt, header, columns)
    examples = []
    for line, row in rows:
        where = f"{path}:{line}"
        fields: dict[str, Any] = {}
        for role in ("text_a", "text_b"):
            if role in columns:
                fields[role] = _text(row, columns[role], role, where, fmt)
        fields["label"] = labels.id(_cell(row, columns["label"], where, fmt), where)
        examples.append(Example(**fields))
    if not examples:
        raise TaskError(f"{path}: the {what} has no examples")
    return examples


def read_rows(
    path: str | Path,
    columns: Mapping[str, Column],
    label_names: Sequence[str],
    format: str | None = None,
    header: bool = True,
    optional: Sequence[str] = (),
) -> list[tuple[str, Example]]:
    """(row id, example) per row of a file to classify: text_a (and text_b) required; `label` and `id` columns
    if given (an example's label is None without one; ids default to the 1-based row number). Roles named in
    `optional` are dropped when the header (or the first JSON line) lacks their column."""
    path = Path(path)
    fmt = file_format(path, format)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the input file ({exc.strerror or exc})") from None
    text = decode_text(raw, path)
    if optional and (header or fmt == "jsonl"):
        first = next(iter(_any_rows(text, path, fmt, False, {})), (0, {}))[1]
        names = set(first) if isinstance(first, dict) else {cell.strip() for cell in first}
        columns = {role: c for role, c in columns.items() if role not in optional or c in names}
    labels = LabelReader(label_names, None, columns["label"]) if "label" in columns else None
    rows, ids = [], set()
    for number, (line, row) in enumerate(_any_rows(text, path, fmt, header, columns), 1):
        where = f"{path}:{line}"
        fields = {role: _text(row, columns[role], role, where, fmt) for role in ("text_a", "text_b") if role in columns}
        if labels is not None:
            fields["label"] = labels.id(_cell(row, columns["label"], where, fmt), where)
        row_id = str(_cell(row, columns["id"], where, fmt)) if "id" in columns else str(number)
        if row_id in ids:
            raise TaskError(f"{where}: id {row_id!r} appears twice in column {columns['id']!r}")
        ids.add(row_id)
        rows.append((row_id, Example(**fields)))
    if not rows:
        raise TaskError(f"{path}: the input file has no rows")
    return rows


def _any_rows(text: str, path: Path, fmt: str, header: bool, columns: Mapping[str, Column]):
    return _jsonl_rows(text, path) if fmt == "jsonl" else _delimited_rows(text, path, fmt, header, columns)


def _delimited_rows(text: str, path: Path, fmt: str, header: bool, columns: Mapping[str, Column]):
    """(line, {column: value}) or (line, [values]) per non-blank row of a CSV/TSV file."""
    options: dict[str, Any] = {"delimiter": ",", "strict": True} if fmt == "csv" else {
        "delimiter": "\t", "quoting": csv.QUOTE_NONE}  # fmt: skip
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    names: list[str] | None = None
    previous_end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            detail = f"{exc}; an unbalanced quote?" if "end of data" in str(exc) else str(exc)
            raise TaskError(f"{path}:{previous_end + 1}: malformed {fmt.upper()} row ({detail})") from None
        line, previous_end = previous_end + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header and names is None:
            names = [cell.strip() for cell in row]
            for role, column in columns.items():
                if column not in names:
                    raise TaskError(f"{path}:{line}: no column {column!r} for {role} in the header; available "
                                    f"columns: {', '.join(repr(n) for n in names)}")  # fmt: skip
                if names.count(column) > 1:  # type: ignore[arg-type]
                    raise TaskError(f"{path}:{line}: the header names column {column!r} twice")
            continue
        if names is not None:
            if len(row) != len(names):
                raise TaskError(f"{path}:{line}: malformed row: {len(row)} fields, but the header has {len(names)} "
                                f"({'an unquoted comma or quote?' if fmt == 'csv' else 'a stray tab?'})")  # fmt: skip
            yield line, dict(zip(names, row, strict=True))
        else:
            needed = max((int(c) for c in columns.values()), default=-1)
            if len(row) <= needed:
                raise TaskError(f"{path}:{line}: malformed row: {len(row)} fields, but column index {needed} "
                                f"is used (indices count from 0)")  # fmt: skip
            yield line, row


def _jsonl_rows(text: str, path: Path):
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{line}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{line}: malformed row: expected a JSON object, got {type(record).__name__}")
        yield line, record


def _cell(row: dict[str, Any] | list[str], column: Column, where: str, fmt: str) -> Any:
    if isinstance(row, list):
        return row[int(column)]
    if column not in row:  # only JSONL rows can lack a key; CSV/TSV headers are checked once
        available = ", ".join(repr(k) for k in row) or "none"
        raise TaskError(f"{where}: no column {column!r}; available columns: {available}")
    return row[column]  # type: ignore[index]


def _text(row, column: Column, role: str, where: str, fmt: str) -> str:
    return text_value(_cell(row, column, where, fmt), column, role, where)


def text_value(value: Any, column: Column, role: str, where: str) -> str:
    """A cell's text, trimmed; None counts as empty; errors name the place, column and role."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise TaskError(f"{where}: column {column!r} ({role}) must hold text, got {type(value).__name__} {value!r}")
    value = value.strip()
    if not value:
        raise TaskError(f"{where}: empty text in column {column!r} ({role})")
    if len(value) > MAX_TEXT_CHARS:
        raise TaskError(f"{where}: text in column {column!r} is {len(value)} characters; the limit is "
                        f"{MAX_TEXT_CHARS}")  # fmt: skip
    return value


class LabelReader:
    """A label cell -> class id: a class name or id, or (with `values`) one of the values given per class."""

    def __init__(self, names: Sequence[str], values: Sequence[str] | None, column: Column):
        self.column = column
        self.values = list(values) if values is not None else None
        self.names = list(names)
        self.by_name = {name: i for i, name in enumerate(names)}

    def id(self, raw: Any, where: str) -> int:
        if self.values is not None:
            text = str(raw).strip() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
            if text in self.values:
                return self.values.index(text)
            allowed = ", ".join(repr(v) for v in self.values)
        else:
            if isinstance(raw, str):
                text = raw.strip()
                if text in self.by_name:
                    return self.by_name[text]
                if text.isascii() and text.isdigit() and int(text) < len(self.names):
                    return int(text)
            elif isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(self.names):
                return raw
            names = ", ".join(repr(n) for n in self.names)
            allowed = f"{names}, or ids 0..{len(self.names) - 1}"
        raise TaskError(f"{where}: unknown label {raw!r} in column {self.column!r}; allowed: {allowed}")
