"""The template renderer both sides share, with a character-level stand-in tokenizer (no ML library)."""

from __future__ import annotations

import pytest

from lmaas_protocol import Example, FieldError
from lmaas_runtime.rendering import TemplateRenderer, special_token_frame

CLS, SEP, BOS, MASK = 1, 2, 3, 4


class CharTokenizer:
    """One token per character (its code point); `framed` adds [CLS] ... [SEP] or <s> ... as special tokens."""

    def __init__(self, frame: tuple[list[int], list[int]], mask_token_id: int | None):
        self.frame = frame
        self.mask_token_id = mask_token_id

    def __call__(self, text, add_special_tokens: bool = True):
        texts = [text] if isinstance(text, str) else text
        ids = [[ord(c) for c in t] for t in texts]
        if add_special_tokens:
            ids = [self.frame[0] + row + self.frame[1] for row in ids]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i > MASK)


def masked() -> TemplateRenderer:
    return TemplateRenderer(CharTokenizer(([CLS], [SEP]), MASK), causal=False, max_length=64)


def causal(max_length: int = 64) -> TemplateRenderer:
    return TemplateRenderer(CharTokenizer(([BOS], []), None), causal=True, max_length=max_length)


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_special_token_frame_is_found_around_a_probe():
    assert special_token_frame(CharTokenizer(([CLS], [SEP]), MASK)) == ([CLS], [SEP])
    assert special_token_frame(CharTokenizer(([], []), None)) == ([], [])


def test_masked_lm_prefix_prompt_and_the_space_before_mask_goes_to_the_label_word():
    [item] = masked().render("{prompt}{text_a} It was {mask}.", [Example(text_a="ok")], 3, False)
    assert item.ids == [CLS, *chars("ok It was"), MASK, *chars("."), SEP]
    assert (item.prompt_at, item.mask_at) == (1, 10)
    assert item.length(3) == len(item.ids) + 3
    assert item.label_position(3, causal=False) == 13  # the mask moved right by the 3 prompt positions


def test_causal_lm_suffix_prompt_reads_the_token_before_the_answer_cue():
    [item] = causal().render("{text_a}{prompt} Answer: {mask}", [Example(text_a="hi")], 2, False)
    assert item.ids == [BOS, *chars("hi"), *chars(" Answer:")]
    assert (item.prompt_at, item.mask_at) == (3, len(item.ids))
    assert item.label_position(2, causal=True) == len(item.ids) + 2 - 1
    assert item.label_position(0, causal=True) == len(item.ids) - 1


def test_a_causal_template_must_end_with_mask():
    with pytest.raises(FieldError) as error:
        causal().render("{text_a} {mask} and more", [Example(text_a="x")], 0, False)
    assert error.value.param == "template"


def test_a_masked_lm_needs_a_mask_token():
    with pytest.raises(ValueError, match="mask token"):
        TemplateRenderer(CharTokenizer(([], []), None), causal=False, max_length=8)


def test_over_long_examples_are_rejected_by_index_or_truncated_from_their_longest_text():
    renderer = causal(max_length=20)
    examples = [Example(text_a="short"), Example(text_a="a" * 30, text_b="bb")]
    with pytest.raises(FieldError) as error:
        renderer.render("{text_a}|{text_b}{prompt}:{mask}", examples, 4, truncate=False)
    assert error.value.param == "examples.1"
    short, cut = renderer.render("{text_a}|{text_b}{prompt}:{mask}", examples, 4, truncate=True)
    assert short.ids == [BOS, *chars("short|"), *chars(":")]
    assert cut.length(4) <= 20
    assert cut.ids[-4:] == chars("|bb:")  # text_b and the cue are kept; text_a lost its end


def test_an_example_that_cannot_fit_names_its_index():
    renderer = causal(max_length=6)
    with pytest.raises(FieldError) as error:
        renderer.render("{text_a} long literal text{prompt}:{mask}", [Example(text_a="abc")], 2, truncate=True)
    assert error.value.param == "examples.0"
