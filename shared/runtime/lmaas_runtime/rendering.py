"""Render examples through a template into token ids, once per request and independent of the prompt.

A template such as ``"{prompt}Review: {text_a}\\nSentiment:{mask}"`` is cut at its {prompt} and {mask}
slots; the text between them (literals with the example's texts filled in) is tokenized as whole pieces
so a sub-word tokenizer sees the same strings it would see in running text. The prompt is inserted later,
per candidate, at `prompt_at`; the label is read at `mask_at` (masked LM: the mask token there; causal LM:
the next-token logits of the token before it, since {mask} ends the template). Spaces right before {mask}
are dropped: label words carry their own leading space (" great"), as RoBERTa's <mask> token absorbs it.

Shared by the server and the client's local white-box copy (prompt tuning, GDFO's student) so both render
token for token alike. The tokenizer is duck-typed (a Hugging Face tokenizer: callable, `decode`,
`mask_token_id`), so this module imports no ML library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from lmaas_protocol.base import FieldError
from lmaas_protocol.schemas import Example
from lmaas_protocol.templates import mask_ends_template, parse_template

MAX_TRUNCATION_ROUNDS = 6


@dataclass(frozen=True)
class RenderedExample:
    ids: list[int]  # the example's tokens without the prompt, special tokens included
    prompt_at: int  # where the P prompt positions are inserted into `ids` (-1: template has no slot)
    mask_at: int  # index in `ids` of the mask slot (masked LM: the mask token; causal LM: len(ids))

    def length(self, prompt_length: int) -> int:
        return len(self.ids) + (prompt_length if self.prompt_at >= 0 else 0)

    def label_position(self, prompt_length: int, causal: bool) -> int:
        """Position whose logits decide the label, once `prompt_length` prompt tokens are inserted."""
        shifted = self.mask_at + (prompt_length if 0 <= self.prompt_at <= self.mask_at else 0)
        return shifted - 1 if causal else shifted


class Tokenizer(Protocol):
    """What rendering needs of a Hugging Face tokenizer."""

    mask_token_id: int | None

    def __call__(self, text: Any, add_special_tokens: bool = ...) -> Any: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TemplateRenderer:
    def __init__(self, tokenizer: Tokenizer, causal: bool, max_length: int):
        self.tokenizer = tokenizer
        self.causal = causal
        self.max_length = max_length
        self.prefix_ids, self.suffix_ids = special_token_frame(tokenizer)
        if causal:
            self.suffix_ids = []  # the label is read at the end: nothing may follow the answer cue
            self.mask_id = None
        else:
            self.mask_id = tokenizer.mask_token_id
            if self.mask_id is None:
                raise ValueError("a masked LM needs a tokenizer with a mask token")

    def render(
        self,
        template: str,
        examples: list[Example],
        prompt_length: int,
        truncate: bool,
        shortest_prompt: int | None = None,
    ) -> list[RenderedExample]:
        """Render every example; over-long ones are shortened (`truncate`) or rejected naming the example.

        `prompt_length` is the longest prompt of the request (it bounds the length); `shortest_prompt` the
        shortest (with it, a causal LM's label position comes earliest and must still exist).
        """
        shortest = prompt_length if shortest_prompt is None else shortest_prompt
        segments = parse_template(template)
        if self.causal and not mask_ends_template(segments):
            raise FieldError("template", "for a causal LM {mask} must end the template (it is the answer cue)")
        pieces = [self._pieces(segments, e) for e in examples]
        flat = [p for example_pieces in pieces for p in example_pieces if isinstance(p, str)]
        encoded = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
        rendered = [self._assemble(example_pieces, encoded) for example_pieces in pieces]
        for i, item in enumerate(rendered):
            if item.length(prompt_length) > self.max_length:
                if not truncate:
                    raise FieldError(
                        f"examples.{i}",
                        f"renders to {item.length(prompt_length)} tokens with the prompt; the limit is "
                        f"{self.max_length} (shorten it or set truncate=true)",
                    )
                rendered[i] = self._truncated(segments, examples[i], prompt_length, i)
            if self.causal and rendered[i].label_position(shortest, True) < 0:
                raise FieldError(f"examples.{i}", "renders to no token before the answer cue")
        return rendered

    def _pieces(self, segments, example: Example) -> list[str | _Slot]:
        """The strings between the {prompt} and {mask} slots, with the slots as markers."""
        pieces: list[str | _Slot] = []
        current: list[str] = []
        for segment in segments:
            if segment.kind == "literal":
                current.append(segment.value)
            elif segment.value in ("text_a", "text_b"):
                current.append(getattr(example, segment.value) or "")
            elif segment.value == "prompt":
                pieces += ["".join(current), _Slot.PROMPT]
                current = []
            else:  # a space before {mask} belongs to the label word (" great"), as with RoBERTa's <mask>
                pieces += ["".join(current).rstrip(" "), _Slot.MASK]
                current = []
        if not self.causal:  # causal: only whitespace follows {mask}, and nothing is rendered after it
            pieces.append("".join(current))
        return pieces

    def _assemble(self, pieces: list[str | _Slot], encoded) -> RenderedExample:
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

    def _truncated(self, segments, example: Example, prompt_length: int, index: int) -> RenderedExample:
        """Cut the longest text from its end until the rendered example fits."""
        for _ in range(MAX_TRUNCATION_ROUNDS):
            item = self.render_one(segments, example)
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
        raise FieldError(f"examples.{index}", f"does not fit in {self.max_length} tokens even when truncated")

    def render_one(self, segments, example: Example) -> RenderedExample:
        pieces = self._pieces(segments, example)
        strings = [p for p in pieces if isinstance(p, str)]
        encoded = iter(self.tokenizer(strings, add_special_tokens=False)["input_ids"]) if strings else iter(())
        return self._assemble(pieces, encoded)


class _Slot(enum.Enum):
    PROMPT = "prompt"
    MASK = "mask"


def special_token_frame(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [CLS] ... [SEP], or <s>)."""
    probe = "lmaas probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []
