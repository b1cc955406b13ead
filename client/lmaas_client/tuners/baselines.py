"""Baselines that spend no API calls on search: the manual prompt and in-context learning.

- manual: the template with an empty {prompt} slot (zero-shot);
- in-context learning: demonstrations from the training set — `shots_per_class` examples per class, drawn
  with the run's seed — rendered with the task's own template and their label word, joined and placed at
  the {prompt} slot as discrete tokens before the test input (so it needs the prefix placement). It uses
  the same examples as the tuners: no extra data. Long demonstrations are cut to `max_demo_tokens`.
(White-box prompt tuning, the third baseline, trains locally with torch: tuners/prompt_tuning.py.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from lmaas_client.prompts import PromptCandidate
from lmaas_client.tuners.base import Tuner, TunerConfig
from lmaas_protocol import Example
from lmaas_protocol.templates import parse_template


class ManualConfig(TunerConfig):
    pass


class ManualPrompt(Tuner):
    name = "manual"
    config_class = ManualConfig
    black_box = False

    def setup(self, context) -> None:
        self.best = PromptCandidate()

    def ask(self) -> list[PromptCandidate]:
        return []

    def update(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        raise ValueError("the manual prompt asks for nothing")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class InContextConfig(TunerConfig):
    shots_per_class: int = Field(1, ge=1, le=16, description="Demonstrations per class (LM-BFF: 1).")
    max_demo_tokens: int = Field(48, ge=4, description="Each demonstration's text is cut to this many tokens.")
    separator: str = Field("\n\n", description="Between demonstrations, and before the test input.")


class InContextLearning(ManualPrompt):
    name = "icl"
    config_class = InContextConfig
    config: InContextConfig

    def setup(self, context) -> None:
        if context.placement != "prefix":
            raise ValueError("in-context learning needs --placement prefix: demonstrations precede the input")
        self._tokenize = context.client.tokenize
        demos = self.demonstrations(context.train, context.task.num_classes)
        template = context.task.template(context.info.family, "prefix")
        words = context.task.label_words[context.info.family]
        texts = [render_demo(template, demo, words[demo.label], self._cut) for demo in demos]
        text = self.config.separator.join(texts) + self.config.separator
        ids = context.client.tokenize([text]).ids[0]
        limit = context.info.limits.max_prompt_length
        self.best = PromptCandidate(token_ids=ids[-limit:], meta={"demonstrations": [d.model_dump() for d in demos]})

    def demonstrations(self, train: list[Example], num_classes: int) -> list[Example]:
        rng = np.random.default_rng(self.config.seed)
        chosen = []
        for label in range(num_classes):
            pool = [e for e in train if e.label == label]
            picks = rng.choice(len(pool), size=min(self.config.shots_per_class, len(pool)), replace=False)
            chosen += [pool[i] for i in picks]
        order = rng.permutation(len(chosen))  # classes interleaved, not blocked
        return [chosen[i] for i in order]

    def _cut(self, text: str) -> str:
        ids = self._tokenize([text], return_tokens=True).tokens[0]
        if len(ids) <= self.config.max_demo_tokens:
            return text
        words = text.split()  # cut on word boundaries, proportionally to the token count
        keep = max(1, len(words) * self.config.max_demo_tokens // len(ids))
        return " ".join(words[:keep])


def render_demo(template: str, example: Example, label_word: str, cut) -> str:
    """The template filled with a training example and its label word, without the prompt slot."""
    out = []
    for segment in parse_template(template):
        if segment.kind == "literal":
            out.append(segment.value)
        elif segment.value in ("text_a", "text_b"):
            out.append(cut(getattr(example, segment.value) or ""))
        elif segment.value == "mask":
            out[-1:] = [out[-1].rstrip(" ")] if out else []
            out.append(label_word)
    return "".join(out).strip()
