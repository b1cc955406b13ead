"""Tasks: label names, templates per model family and prompt placement, label words, metric.

The six shipped tasks (sst2, mrpc, rte, snli, agnews, dbpedia) follow BBT for masked LMs (RoBERTa-style
label words with a leading space, templates such as ``<P> . {x} . It was <mask> .``). Causal LMs get an
answer cue at the end instead of a mask (``...\\nSentiment:{mask}``) and leading-space label words.

Placements:
- "prefix": the prompt comes before all text, as in the papers;
- "suffix": the prompt comes after all of the example's text. For causal LMs it sits right before the
  answer cue, so the server can compute the text's keys/values once and reuse them for every candidate.
  For masked LMs it sits right before the mask part when that follows the text (SST-2), else at the end.

The verbalizer uses the first sub-token of each label word; the words of every shipped task are distinct
in their first sub-token for SmolLM2's tokenizer (multi-token words are named in the task description).
The label order of each task is that of ``data/<task>/meta.json``. User-defined tasks (CSV/TSV/JSONL files
with a task file or flags) are built by :mod:`lmaas_client.tasks.files`; they carry their own `loader`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lmaas_protocol import Example, parse_template
from lmaas_protocol.templates import TEXT_SLOTS, Segment, mask_ends_template

Family = Literal["masked", "causal"]
Placement = Literal["prefix", "suffix"]
PlacementChoice = Literal["auto", "prefix", "suffix"]  # auto: `default_placement` of the served family
Metric = Literal["accuracy", "f1"]
Split = Literal["train", "dev", "test"]
FAMILIES: tuple[Family, ...] = ("masked", "causal")
PLACEMENTS: tuple[Placement, ...] = ("prefix", "suffix")
METRICS: tuple[Metric, ...] = ("accuracy", "f1")


def default_placement(family: str) -> Placement:
    """Suffix on causal LMs: the server reuses the text's keys/values (several times cheaper per call) and
    it scored at or above prefix in every measured run; prefix on masked LMs, as in the papers."""
    return "suffix" if family == "causal" else "prefix"


SHIPPED_SEEDS = (13, 21, 42, 87, 100)

# (split, seed) -> the split's examples, labels already 0-based ids. A user task's seed may be ignored
# (one fixed split for every seed) when its `seeds` is empty.
SplitLoader = Callable[[Split, int], list[Example]]


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    label_names: tuple[str, ...]
    # templates[family][placement]; each has at most one {prompt} slot
    templates: dict[Family, dict[Placement, str]]
    label_words: dict[Family, tuple[str, ...]]
    metric: Metric = "accuracy"  # "f1": F1 of class 1, the positive class (MRPC: "equivalent")
    text_fields: tuple[str, ...] = ("text_a",)
    description: str = ""
    # Few-shot splits (16-<seed>); empty: one fixed split whatever the seed (user tasks without {seed}), or a
    # split drawn for any seed (tasks from a Hugging Face dataset)
    seeds: tuple[int, ...] = field(default=SHIPPED_SEEDS)
    # Test examples scored by default: a fixed stratified subsample of this size (data.QUICK_TEST_SEED,
    # the same for every run and method); None: the full test set. The full set stays selectable.
    quick_test_size: int | None = None
    # A short task instruction: the text under a soft prompt started from it (init_tokens="instruction"), so
    # that z = 0 is already a sensible prompt instead of arbitrary vocabulary tokens.
    instruction: str | None = None
    # Where the examples come from: None for shipped tasks (data/<name>/...), else a function
    # (split, seed) -> examples; `source` names the task file (or "flags") of a user task.
    loader: SplitLoader | None = field(default=None, compare=False, repr=False)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.label_names) < 2:
            raise TaskError(f"task {self.name}: needs at least 2 classes, got {list(self.label_names)}")
        if len(set(self.label_names)) != len(self.label_names):
            raise TaskError(f"task {self.name}: label names repeat: {list(self.label_names)}")
        if self.metric not in METRICS:
            raise TaskError(f"task {self.name}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.metric == "f1" and len(self.label_names) != 2:
            raise TaskError(f"task {self.name}: metric f1 needs exactly 2 classes (F1 of class 1)")
        if self.quick_test_size is not None and self.quick_test_size < 1:
            raise TaskError(f"task {self.name}: quick_test_size must be a positive integer or None")
        for family, words in self.label_words.items():
            if len(words) != len(self.label_names):
                raise TaskError(
                    f"task {self.name}: {len(words)} {family} label words {list(words)} do not match the "
                    f"{len(self.label_names)} classes {list(self.label_names)}"
                )
            if len(set(words)) != len(words) or not all(w.strip() for w in words):
                raise TaskError(f"task {self.name}: {family} label words must be distinct and non-empty: {words}")
        for family, by_placement in self.templates.items():
            if family not in self.label_words:
                raise TaskError(f"task {self.name}: {family} templates but no {family} label words")
            for placement, template in by_placement.items():
                if problem := template_problem(template, self.text_fields, family, placement):
                    raise TaskError(f"task {self.name}: {family} {placement} template {template!r}: {problem}")

    def auto_placement(self, family: Family) -> Placement:
        """`default_placement(family)` when this task has a template for it, else the placement it has (a user
        template written with {prompt} where only one placement fits)."""
        available = self.templates.get(family, {})
        preferred = default_placement(family)
        return preferred if preferred in available or not available else next(iter(available))

    def template(self, family: Family, placement: Placement = "prefix") -> str:
        try:
            return self.templates[family][placement]
        except KeyError:
            raise TaskError(f"task {self.name} has no {placement} template for {family} LMs") from None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def template_problem(
    template: str, text_fields: tuple[str, ...], family: str | None = None, placement: str | None = None
) -> str | None:
    """What makes `template` unusable, or None: it must parse, use exactly the task's text slots, end with
    {mask} for causal LMs, and (suffix placement) have its {prompt} after every text slot."""
    try:
        segments = parse_template(template)
    except ValueError as exc:
        return str(exc)
    slots = {s.value for s in segments if s.kind == "slot"}
    missing = [f for f in text_fields if f not in slots]
    extra = [f for f in TEXT_SLOTS if f in slots and f not in text_fields]
    if missing:
        return f"it has no {{{missing[0]}}} slot, but the examples have a {missing[0]}"
    if extra:
        return f"it uses {{{extra[0]}}}, but the examples have only {', '.join(text_fields)}"
    if family == "causal" and not mask_ends_template(segments):
        return "for causal LMs {mask} must end the template (the answer cue)"
    if placement == "suffix" and not prompt_follows_text(segments):
        return "a suffix template needs {prompt} after every text slot"
    return None


def prompt_follows_text(segments: list[Segment]) -> bool:
    """True when the template has a {prompt} slot and no text slot after it."""
    kinds = [s.value for s in segments if s.kind == "slot"]
    if "prompt" not in kinds:
        return False
    return not any(k in TEXT_SLOTS for k in kinds[kinds.index("prompt") :])
