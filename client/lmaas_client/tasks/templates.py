"""Label words and templates of a user task, normalised per model family and prompt placement.

`user_task` (tasks.files) accepts label words as one list or one list per family, and templates as one
string, one per family, or one per family and placement; these functions turn every accepted form into
words[family] and templates[family][placement], checking each and raising through `bad(key, detail)` so
the caller can name the setting (and a task file's line).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from lmaas_client.tasks.spec import FAMILIES, PLACEMENTS, Family, Placement, prompt_follows_text, template_problem
from lmaas_protocol import parse_template
from lmaas_protocol.templates import TEXT_SLOTS, mask_ends_template

TemplatesArg = str | Mapping[str, str | Mapping[str, str]]
LabelWordsArg = Sequence[str] | Mapping[str, Sequence[str]]


def label_words_by_family(label_words: LabelWordsArg, classes: int, bad) -> dict[Family, tuple[str, ...]]:
    """words[family]: one list for both families, or a table per family; `classes` distinct non-empty words each."""
    if isinstance(label_words, Mapping):
        unknown = sorted(set(label_words) - set(FAMILIES))
        if unknown or not label_words:
            raise bad("label_words", f"label words are one list, or lists per family (masked, causal); "
                                     f"unknown family {unknown[0] if unknown else None!r}")  # fmt: skip
        by_family = {family: label_words[family] for family in FAMILIES if family in label_words}
    else:
        by_family = dict.fromkeys(FAMILIES, label_words)
    words: dict[Family, tuple[str, ...]] = {}
    for family, values in by_family.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not all(isinstance(w, str) for w in values):
            raise bad(f"label_words.{family}", f"{family} label words must be a list of strings, got {values!r}")
        if len(values) != classes:
            raise bad(f"label_words.{family}", f"{len(values)} {family} label words {list(values)} for {classes} classes "
                                     f"(one word per class, in the order of the label names)")  # fmt: skip
        if not all(w.strip() for w in values) or len(set(values)) != len(values):
            raise bad(f"label_words.{family}", f"{family} label words must be distinct and non-empty: {list(values)}")
        words[family] = tuple(values)
    return words


def templates_by_family(
    templates: TemplatesArg, words: dict[Family, tuple[str, ...]], text_fields: tuple[str, ...], bad
) -> dict[Family, dict[Placement, str]]:
    """Normalize the three accepted forms into templates[family][placement], checking each."""

    def check(template: Any, key: str, family: str | None = None, placement: str | None = None) -> str:
        label = " ".join(p for p in (family, placement) if p) + " " if family else ""
        if not isinstance(template, str):
            raise bad(key, f"{label}template must be a string, got {template!r}")
        if problem := template_problem(template, text_fields, family, placement):
            raise bad(key, f"{label}template {template!r}: {problem}")
        return template

    given: dict[str, Any]
    if isinstance(templates, str):
        check(templates, "templates")
        ends = mask_ends_template(parse_template(templates))
        given = {family: templates for family in words if family != "causal" or ends}
        if not given:
            raise bad("templates", f"template {templates!r}: causal LMs need {{mask}} at its end; give a causal "
                                   f"template or masked label words")  # fmt: skip
    elif isinstance(templates, Mapping) and templates:
        unknown = sorted(set(templates) - set(FAMILIES))
        if unknown:
            raise bad("templates", f"templates are one string, or one per family (masked, causal); unknown "
                                   f"family {unknown[0]!r}")  # fmt: skip
        given = dict(templates)
    else:
        raise bad("templates", f"templates must be a string or a table per family, got {templates!r}")

    out: dict[Family, dict[Placement, str]] = {}
    for family, value in given.items():
        key = f"templates.{family}"
        if family not in words:
            raise bad(key, f"a {family} template, but no {family} label words")
        if isinstance(value, Mapping):
            if not value or not set(value) <= set(PLACEMENTS):
                raise bad(key, f"{family} templates are one string or a table with prefix and/or suffix")
            placed = {}
            for placement, template in value.items():
                check(template, f"{key}.{placement}", family)
                placed[placement] = template if "{prompt}" in template else placements_of(template)[placement]
            keys = {placement: f"{key}.{placement}" for placement in placed}
        else:
            placed = placements_of(check(value, key, family))
            keys = dict.fromkeys(placed, key)
        for placement, template in placed.items():  # the final forms: causal cue, suffix {prompt} after the text
            check(template, keys[placement], family, placement)
        out[family] = placed  # type: ignore[index,assignment]
    return out


def placements_of(template: str) -> dict[Placement, str]:
    """A template written with {prompt} fits one placement; one without it gets prefix and suffix forms."""
    segments = parse_template(template)
    if any(s.kind == "slot" and s.value == "prompt" for s in segments):
        return {"suffix" if prompt_follows_text(segments) else "prefix": template}
    return {"prefix": "{prompt}" + template, "suffix": insert_suffix_prompt(template)}


def insert_suffix_prompt(template: str) -> str:
    """Insert {prompt} after the last line break that follows the last text slot, else right after that slot.

    "Review: {text_a}\\nSentiment:{mask}" -> "Review: {text_a}\\n{prompt}Sentiment:{mask}";
    "{text_a} . It was {mask} ." -> "{text_a}{prompt} . It was {mask} .".
    """
    parts: list[tuple[str, str | None]] = []
    pending = ""  # the parser cuts literals at escaped braces: glue them back to their slot
    for literal, name, _, _ in string.Formatter().parse(template):
        pending += literal
        if name is not None:
            parts.append((pending, name))
            pending = ""
    if pending:
        parts.append((pending, None))
    last_text = max(i for i, (_, name) in enumerate(parts) if name in TEXT_SLOTS)
    head, rest = parts[: last_text + 1], parts[last_text + 1 :]
    literal = rest[0][0] if rest else ""
    cut = literal.rfind("\n") + 1  # 0 when no line break follows the text
    tail = [(literal[cut:], rest[0][1]), *rest[1:]] if rest else []
    return _join(head) + _escape(literal[:cut]) + "{prompt}" + _join(tail)


def _join(parts: list[tuple[str, str | None]]) -> str:
    return "".join(_escape(literal) + ("{" + name + "}" if name is not None else "") for literal, name in parts)


def _escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")
