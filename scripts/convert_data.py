#!/usr/bin/env python3
"""Convert the raw benchmark files (LM-BFF / RLPrompt / e-SNLI / ordered-prompt
copies) into the project's own JSONL layout under data/.

    python scripts/convert_data.py [--src ../shared/data] [--dst data]

Relative paths are resolved against the repository root (the parent of this
script's folder), so the command works from any working directory.  Standard
library only; the output is deterministic, so re-running it is a no-op in git.
See data/PROVENANCE.md for what the sources are and data/README.md for the format.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT_REL = "scripts/convert_data.py"
SEEDS = (13, 21, 42, 87, 100)

# Per task: label names (index = label id), whether it is a sentence pair,
# how rows are parsed ("glue": literal tab split as LM-BFF does; "csv":
# tab-separated with CSV quoting, as RLPrompt writes/reads them via pandas),
# the (text_a, text_b, label) column indices with the header names expected
# there, the allowed field counts and the raw-label -> id map.
# License strings are copied from the shared PROVENANCE.md.
TASKS = {
    "sst2": dict(
        labels=["negative", "positive"],
        fmt="glue",
        cols=(0, None, 1),
        header=({"sentence"}, None, {"label"}),
        nfields={2},
        label_map={"0": 0, "1": 1},
        license="SST-2 (Stanford Sentiment Treebank via GLUE): no explicit license from "
        'Stanford; HF/GLUE card lists "unknown"; research use.',
    ),
    "mrpc": dict(
        labels=["not_equivalent", "equivalent"],
        fmt="glue",
        cols=(3, 4, 0),
        header=({"#1 String"}, {"#2 String"}, {"Quality"}),
        nfields={5},
        label_map={"0": 0, "1": 1},
        license="MRPC (Microsoft Research Paraphrase Corpus via GLUE): Microsoft research "
        'data terms; HF card "unknown".',
    ),
    "rte": dict(
        labels=["entailment", "not_entailment"],
        fmt="glue",
        cols=(1, 2, -1),
        header=({"sentence1"}, {"sentence2"}, {"label"}),
        nfields={4},
        label_map={"entailment": 0, "not_entailment": 1},
        license='RTE (PASCAL RTE 1-3,5 via GLUE): no explicit license; HF card "unknown"; research use.',
    ),
    # SNLI rows carry 1 or 5 annotator labels (11 or 15 fields; the header has
    # 11), so the gold label is always the last field, as in LM-BFF.
    "snli": dict(
        labels=["entailment", "neutral", "contradiction"],
        fmt="glue",
        cols=(7, 8, -1),
        header=({"sentence1"}, {"sentence2"}, {"gold_label"}),
        nfields={11, 15},
        label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
        license="SNLI: CC BY-SA 4.0 (train/dev via GLUE/LM-BFF; test via e-SNLI repo, "
        "MIT code, SNLI text CC BY-SA 4.0).",
    ),
    # RLPrompt labels are already 0-indexed in AG News order World/Sports/Business/Sci-Tech.
    "agnews": dict(
        labels=["World", "Sports", "Business", "Tech"],
        fmt="csv",
        cols=(0, None, 1),
        header=({"text", "sentence"}, None, {"label"}),
        nfields={2},
        label_map={str(i): i for i in range(4)},
        license='AG News (Zhang et al. 2015, from AG\'s corpus): "for non-commercial/academic use"; HF card "unknown".',
    ),
    # DBpedia-14 order as in classes.txt; RLPrompt files use 0..13.
    "dbpedia": dict(
        labels=[
            "Company",
            "EducationalInstitution",
            "Artist",
            "Athlete",
            "OfficeHolder",
            "MeanOfTransportation",
            "Building",
            "NaturalPlace",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "WrittenWork",
        ],
        fmt="csv",
        cols=(0, None, 1),
        header=({"sentence"}, None, {"label"}),
        nfields={2},
        label_map={str(i): i for i in range(14)},
        license="DBpedia-14 (Zhang et al. 2015): CC BY-SA 3.0 and GNU FDL "
        "(see LICENSE-NOTICE.txt alongside, a verbatim copy of the dataset readme.txt).",
    ),
}
PAIR_TASKS = {"mrpc", "rte", "snli"}
# Files copied verbatim next to the converted data (license notice must travel with it).
VERBATIM = {
    "dbpedia/test_ordered_prompt/readme.txt": "dbpedia/LICENSE-NOTICE.txt",
    "dbpedia/test_ordered_prompt/classes.txt": "dbpedia/classes.txt",
}


class ConversionError(Exception):
    pass


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def verify_sources(src: Path) -> list[dict]:
    """Check every file listed in provenance.json, then cross-check the LM-BFF
    k-shot copies against LM-BFF's own checksum file. Fails on first mismatch."""
    prov = json.loads((src / "provenance.json").read_text(encoding="utf-8"))
    for entry in prov:
        path = src / entry["dest"]
        if not path.is_file():
            raise ConversionError(f"missing source file: {path}")
        got = md5(path)
        if got != entry["md5"]:
            raise ConversionError(f"md5 mismatch for {path}: expected {entry['md5']}, got {got}")
    lmbff = {}
    for line in read_text(src / "LM-BFF_k-shot_checksum").split("\n"):
        if line.strip():
            digest, name = line.split(maxsplit=1)
            lmbff[name.strip()] = digest
    for entry in prov:
        if entry["path"].startswith("data/k-shot/") and entry["path"].endswith(".tsv"):
            key = entry["path"][len("data/k-shot/") :]
            if lmbff.get(key) != entry["md5"]:
                raise ConversionError(f"{entry['dest']} does not match LM-BFF checksum for {key}")
    return prov


def read_text(path: Path) -> str:
    """Decode strictly as UTF-8, drop a leading BOM, normalise CRLF to LF."""
    text = path.read_bytes().decode("utf-8")
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_rows(path: Path, fmt: str) -> list[list[str]]:
    """Return the rows (header first) of a tab-separated file."""
    text = read_text(path)
    if fmt == "csv":
        # RLPrompt files were written by pandas: fields with tabs/quotes are
        # wrapped in "..." with "" escapes (e.g. 281 AG News test rows).
        return list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    # LM-BFF/GLUE files are split literally: MRPC has unbalanced '"' in texts.
    return [line.split("\t") for line in text.rstrip("\n").split("\n")]


def make_example(task: str, text_a: str, text_b: str | None, label: int) -> dict:
    ex = {"text_a": text_a.strip(), "label": label}
    if task in PAIR_TASKS:
        ex["text_b"] = (text_b or "").strip()
    return ex


def parse_tsv(task: str, path: Path) -> tuple[list[dict], int]:
    spec = TASKS[task]
    rows = read_rows(path, spec["fmt"])
    header, body = rows[0], rows[1:]
    for col, allowed in zip(spec["cols"], spec["header"], strict=False):
        if allowed is not None and header[col] not in allowed:
            raise ConversionError(f"{path}: unexpected header {header!r}")
    examples, dropped = [], 0
    ia, ib, il = spec["cols"]
    for n, fields in enumerate(body, start=2):
        if len(fields) not in spec["nfields"]:
            raise ConversionError(f"{path}:{n}: unparseable row with {len(fields)} fields")
        raw = fields[il].strip()
        if task == "snli" and raw == "-":  # no annotator consensus: no gold label
            dropped += 1
            continue
        if raw not in spec["label_map"]:
            raise ConversionError(f"{path}:{n}: unknown label {raw!r}")
        examples.append(make_example(task, fields[ia], None if ib is None else fields[ib], spec["label_map"][raw]))
    return examples, dropped


def parse_snli_test(src: Path) -> tuple[list[dict], int]:
    """e-SNLI test: three line-aligned files (premise, hypothesis, label)."""
    d = src / "snli/test_esnli"
    s1, s2, lab = (read_text(d / f).rstrip("\n").split("\n") for f in ("s1.test", "s2.test", "labels.test"))
    if not len(s1) == len(s2) == len(lab):
        raise ConversionError(f"{d}: s1/s2/labels line counts differ")
    label_map, examples, dropped = TASKS["snli"]["label_map"], [], 0
    for n, (a, b, raw) in enumerate(zip(s1, s2, lab, strict=False), start=1):
        raw = raw.strip()
        if raw == "-":
            dropped += 1
            continue
        if raw not in label_map:
            raise ConversionError(f"{d / 'labels.test'}:{n}: unknown label {raw!r}")
        examples.append(make_example("snli", a, b, label_map[raw]))
    return examples, dropped


def parse_dbpedia_test(src: Path) -> tuple[list[dict], int]:
    """ordered-prompt JSONL: {"sentence", "label": "1".."14"} -> 0..13."""
    path = src / "dbpedia/test_ordered_prompt/dev_subsample.jsonl"
    examples = []
    for n, line in enumerate(read_text(path).rstrip("\n").split("\n"), start=1):
        try:
            row = json.loads(line)
            label = int(row["label"]) - 1
            text = row["sentence"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConversionError(f"{path}:{n}: unparseable row ({err})") from err
        if not 0 <= label < 14:
            raise ConversionError(f"{path}:{n}: label {row['label']!r} out of range 1..14")
        examples.append(make_example("dbpedia", text, None, label))
    return examples, 0


def load_task(task: str, src: Path) -> tuple[dict[str, list[dict]], dict[str, int]]:
    splits, dropped = {}, {}
    for seed in SEEDS:
        for part in ("train", "dev"):
            name = f"16-{seed}/{part}"
            splits[name], dropped[name] = parse_tsv(task, src / task / f"{name}.tsv")
    if task == "snli":
        splits["test"], dropped["test"] = parse_snli_test(src)
    elif task == "dbpedia":
        splits["test"], dropped["test"] = parse_dbpedia_test(src)
    else:
        splits["test"], dropped["test"] = parse_tsv(task, src / task / "test.tsv")
    return splits, dropped


def check_texts(task: str, splits: dict[str, list[dict]]) -> list[str]:
    """Report (never drop) empty texts and texts with tabs or stray U+FEFF."""
    warnings = []
    for name, rows in splits.items():
        for i, ex in enumerate(rows, start=1):
            for field in ("text_a", "text_b"):
                text = ex.get(field)
                if text is None:
                    continue
                if not text:
                    warnings.append(f"{task}/{name} example {i}: empty {field}")
                elif "\t" in text or "\ufeff" in text:
                    warnings.append(
                        f"{task}/{name} example {i}: {field} contains "
                        f"{'a tab' if chr(9) in text else 'U+FEFF'} (kept as in source)"
                    )
    return warnings


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def build_meta(task: str, splits, dropped, warnings, prov) -> dict:
    spec = TASKS[task]
    n = len(spec["labels"])
    seen = {(ex["text_a"], ex.get("text_b")) for name, rows in splits.items() if name != "test" for ex in rows}
    return {
        "task": task,
        "label_names": spec["labels"],
        "text_fields": ["text_a", "text_b"] if task in PAIR_TASKS else ["text_a"],
        "splits": {
            name: {
                "count": len(rows),
                "per_class": [sum(ex["label"] == k for ex in rows) for k in range(n)],
                "dropped_rows": dropped[name],
            }
            for name, rows in splits.items()
        },
        "test_examples_also_in_train_or_dev": sum((ex["text_a"], ex.get("text_b")) in seen for ex in splits["test"]),
        "warnings": warnings,
        "sources": [
            {"file": e["dest"], "repo": e["repo"], "commit": e["commit"], "path": e["path"], "md5": e["md5"]}
            for e in prov
            if e["dest"].startswith(task + "/")
        ],
        "license": spec["license"],
        "conversion_script": SCRIPT_REL,
    }


def convert(src: Path, dst: Path) -> None:
    prov = verify_sources(src)
    print(f"verified md5 of {len(prov)} source files in {src}")
    for task in TASKS:
        splits, dropped = load_task(task, src)
        warnings = check_texts(task, splits)
        for name, rows in splits.items():
            out = dst / task / f"{name}.jsonl"
            write_text(out, "".join(dumps(ex) + "\n" for ex in rows))
        meta = build_meta(task, splits, dropped, warnings, prov)
        write_text(dst / task / "meta.json", json.dumps(meta, ensure_ascii=False, sort_keys=True, indent=2) + "\n")
        counts = " ".join(
            f"{k}={v['count']}" + (f"(-{v['dropped_rows']})" if v["dropped_rows"] else "")
            for k, v in meta["splits"].items()
        )
        print(f"{task}: {counts}")
        for w in warnings:
            print(f"  WARNING {w}")
    for rel_src, rel_dst in VERBATIM.items():
        (dst / rel_dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel_src, dst / rel_dst)
        print(f"copied {rel_src} -> {rel_dst}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="../shared/data", help="raw data folder (relative paths: from the repo root)")
    ap.add_argument("--dst", default="data", help="output folder (relative paths: from the repo root)")
    args = ap.parse_args(argv)
    src, dst = (REPO_ROOT / p for p in (args.src, args.dst))  # absolute paths win in '/'
    try:
        convert(src.resolve(), dst.resolve())
    except ConversionError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
