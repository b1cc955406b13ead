"""Prompt templates: plain text with named slots, e.g. ``"{prompt} . {text_a} . It was {mask} ."``.

Slots:
- ``{text_a}`` (required), ``{text_b}``: the example's input text(s);
- ``{prompt}`` (at most once): where the candidate prompt goes (soft vectors or discrete tokens); leaving it
  empty gives the manual-prompt (zero-shot) baseline with the same template;
- ``{mask}`` (exactly once): the label position. Masked LMs put the mask token there; causal LMs read the
  next-token logits at the token just before it, so for them it must end the template (the "answer cue").

Literal braces are written ``{{`` and ``}}``. Both sides parse templates with this module, so the client
can reject a bad template before spending a call.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

TEXT_SLOTS = ("text_a", "text_b")
SLOTS = (*TEXT_SLOTS, "prompt", "mask")
MAX_TEMPLATE_CHARS = 4096


@dataclass(frozen=True)
class Segment:
    kind: Literal["literal", "slot"]
    value: str  # the literal text, or the slot name


def parse_template(template: str) -> list[Segment]:
    """Split `template` into literal and slot segments; raise ValueError naming what is wrong."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"template is longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template is malformed ({exc}); write literal braces as '{{{{' and '}}}}'") from None
    segments: list[Segment] = []
    for literal, field, spec, conversion in parsed:
        if literal:
            segments.append(Segment("literal", literal))
        if field is None:
            continue
        if field not in SLOTS:
            raise ValueError(f"template has unknown slot {{{field}}}; allowed slots: {', '.join(SLOTS)}")
        if spec or conversion:
            raise ValueError(f"template slot {{{field}}} must not carry a format spec or conversion")
        segments.append(Segment("slot", field))
    counts = {name: sum(s.kind == "slot" and s.value == name for s in segments) for name in SLOTS}
    if counts["mask"] != 1:
        raise ValueError(f"template must contain {{mask}} exactly once (found {counts['mask']})")
    if counts["text_a"] < 1:
        raise ValueError("template must contain {text_a}")
    if counts["prompt"] > 1:
        raise ValueError(f"template may contain {{prompt}} at most once (found {counts['prompt']})")
    return segments


def template_slots(template: str) -> set[str]:
    return {s.value for s in parse_template(template) if s.kind == "slot"}


def mask_ends_template(segments: list[Segment]) -> bool:
    """True when nothing but whitespace follows {mask}: required by causal LMs (answer cue)."""
    index = next(i for i, s in enumerate(segments) if s.kind == "slot" and s.value == "mask")
    return all(s.kind == "literal" and not s.value.strip() for s in segments[index + 1 :])
