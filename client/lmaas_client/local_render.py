"""Client-side rendering of task templates, token for token the server's `rendering.TemplateRenderer`."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmaas_client.local_loader import LocalModelError
from lmaas_protocol import Example
from lmaas_protocol.templates import mask_ends_template, parse_template

MAX_TRUNCATION_ROUNDS = 6


@dataclass(frozen=True)
class RenderedExample:
    """The same record as the server's: token ids without the prompt, where it goes, where the label is."""

    ids: list[int]
    prompt_at: int  # -1: the template has no {prompt} slot
    mask_at: int  # masked LM: index of the mask token; causal LM: len(ids)

    def length(self, prompt_length: int) -> int:
        return len(self.ids) + (prompt_length if self.prompt_at >= 0 else 0)

    def label_position(self, prompt_length: int, causal: bool) -> int:
        shifted = self.mask_at + (prompt_length if 0 <= self.prompt_at <= self.mask_at else 0)
        return shifted - 1 if causal else shifted


class _Slot(enum.Enum):
    PROMPT = "prompt"
    MASK = "mask"


class Renderer:
    """Client-side twin of `lmaas_server.rendering.TemplateRenderer` (tests check they agree token for token)."""

    def __init__(self, tokenizer: Any, causal: bool, max_length: int):
        self.tokenizer = tokenizer
        self.causal = causal
        self.max_length = max_length
        self.prefix_ids, self.suffix_ids = special_token_frame(tokenizer)
        if causal:
            self.suffix_ids = []
            self.mask_id = None
        else:
            self.mask_id = tokenizer.mask_token_id
            if self.mask_id is None:
                raise LocalModelError("a masked LM needs a tokenizer with a mask token")

    def render(
        self, template: str, examples: Sequence[Example], prompt_length: int, truncate: bool = True
    ) -> list[RenderedExample]:
        segments = parse_template(template)
        if self.causal and not mask_ends_template(segments):
            raise LocalModelError("for a causal LM {mask} must end the template (it is the answer cue)")
        pieces = [self._pieces(segments, e) for e in examples]
        flat = [p for example_pieces in pieces for p in example_pieces if isinstance(p, str)]
        encoded = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
        rendered = [self._assemble(example_pieces, encoded) for example_pieces in pieces]
        for i, item in enumerate(rendered):
            if item.length(prompt_length) > self.max_length:
                if not truncate:
                    raise LocalModelError(
                        f"example {i} renders to {item.length(prompt_length)} tokens; limit {self.max_length}"
                    )
                rendered[i] = self._truncated(segments, examples[i], prompt_length, i)
            if self.causal and rendered[i].label_position(prompt_length, True) < 0:
                raise LocalModelError(f"example {i} renders to no token before the answer cue")
        return rendered

    def _pieces(self, segments, example: Example) -> list:
        pieces: list = []
        current: list[str] = []
        for segment in segments:
            if segment.kind == "literal":
                current.append(segment.value)
            elif segment.value in ("text_a", "text_b"):
                current.append(getattr(example, segment.value) or "")
            elif segment.value == "prompt":
                pieces += ["".join(current), _Slot.PROMPT]
                current = []
            else:  # a space before {mask} belongs to the label word
                pieces += ["".join(current).rstrip(" "), _Slot.MASK]
                current = []
        if not self.causal:
            pieces.append("".join(current))
        return pieces

    def _assemble(self, pieces: list, encoded) -> RenderedExample:
        ids = list(self.prefix_ids)
        prompt_at = mask_at = -1
        for piece in pieces:
            if piece is _Slot.PROMPT:
                prompt_at = len(ids)
            elif piece is _Slot.MASK:
                mask_at = len(ids)
                if self.mask_id is not None:
                    ids.append(self.mask_id)
            else:
                ids.extend(next(encoded))
        ids.extend(self.suffix_ids)
        return RenderedExample(ids=ids, prompt_at=prompt_at, mask_at=mask_at)

    def _render_one(self, segments, example: Example) -> RenderedExample:
        pieces = self._pieces(segments, example)
        strings = [p for p in pieces if isinstance(p, str)]
        encoded = iter(self.tokenizer(strings, add_special_tokens=False)["input_ids"]) if strings else iter(())
        return self._assemble(pieces, encoded)

    def _truncated(self, segments, example: Example, prompt_length: int, index: int) -> RenderedExample:
        for _ in range(MAX_TRUNCATION_ROUNDS):
            item = self._render_one(segments, example)
            excess = item.length(prompt_length) - self.max_length
            if excess <= 0:
                return item
            field = "text_b" if len(example.text_b or "") > len(example.text_a) else "text_a"
            tokens = self.tokenizer(getattr(example, field), add_special_tokens=False)["input_ids"]
            keep = max(len(tokens) - excess - 1, 0)
            shorter = self.tokenizer.decode(tokens[:keep], skip_special_tokens=True)
            if len(tokens) == 0 or shorter == getattr(example, field):
                break
            example = example.model_copy(update={field: shorter})
        raise LocalModelError(f"example {index} does not fit in {self.max_length} tokens even when truncated")


def special_token_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    probe = "lmaas probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []
