"""Label words and templates of user tasks, normalised per family and placement (lmaas_client.tasks.templates)."""

import pytest

from lmaas_client.tasks.templates import insert_suffix_prompt, label_words_by_family, templates_by_family


class Bad(Exception):
    def __init__(self, key: str, detail: str):
        super().__init__(detail)
        self.key = key


WORDS = {"masked": (" bad", " great"), "causal": (" negative", " positive")}


def test_insert_suffix_prompt():
    assert insert_suffix_prompt("{mask} News: {text_a}") == "{mask} News: {text_a}{prompt}"
    assert (
        insert_suffix_prompt("A: {text_a}\nB: {text_b}\n\nQ:{mask}") == "A: {text_a}\nB: {text_b}\n\n{prompt}Q:{mask}"
    )
    assert insert_suffix_prompt("{text_a} {{x}}\nA:{mask}") == "{text_a} {{x}}\n{prompt}A:{mask}"  # escaped braces


def test_one_word_list_serves_both_families_and_a_table_only_its_own():
    both = label_words_by_family([" no", " yes"], 2, Bad)
    assert both == {"masked": (" no", " yes"), "causal": (" no", " yes")}
    assert label_words_by_family({"causal": [" no", " yes"]}, 2, Bad) == {"causal": (" no", " yes")}


@pytest.mark.parametrize(
    ("words", "key", "needle"),
    [
        ([" no"], "label_words.masked", "1 masked label words"),
        ({"decoder": [" no", " yes"]}, "label_words", "unknown family 'decoder'"),
        ([" no", " no"], "label_words.masked", "distinct"),
        ({"causal": " no yes"}, "label_words.causal", "must be a list of strings"),
    ],
)
def test_bad_label_words_name_their_key(words, key, needle):
    with pytest.raises(Bad, match=needle) as caught:
        label_words_by_family(words, 2, Bad)
    assert caught.value.key == key


def test_one_template_gets_both_placements_per_family():
    out = templates_by_family("Review: {text_a}\nSentiment:{mask}", WORDS, ("text_a",), Bad)
    assert out["causal"] == {
        "prefix": "{prompt}Review: {text_a}\nSentiment:{mask}",
        "suffix": "Review: {text_a}\n{prompt}Sentiment:{mask}",
    }
    assert out["masked"] == out["causal"]


def test_a_template_with_prompt_keeps_its_one_placement():
    out = templates_by_family({"causal": "Review: {text_a}\n{prompt}Sentiment:{mask}"}, WORDS, ("text_a",), Bad)
    assert out == {"causal": {"suffix": "Review: {text_a}\n{prompt}Sentiment:{mask}"}}


@pytest.mark.parametrize(
    ("templates", "key", "needle"),
    [
        ("{text_a} It was {mask}, right?", "templates", "causal LMs need {mask} at its end"),
        ({"causal": {"middle": "{text_a}{mask}"}}, "templates.causal", "prefix and/or suffix"),
        ({"causal": "It was {mask}"}, "templates.causal", "text_a"),
        ({"seq2seq": "{text_a}{mask}"}, "templates", "unknown family 'seq2seq'"),
    ],
)
def test_bad_templates_name_their_key(templates, key, needle):
    words = {"causal": WORDS["causal"]}  # no masked words: a masked-only template cannot serve causal LMs
    with pytest.raises(Bad, match=needle) as caught:
        templates_by_family(templates, words, ("text_a",), Bad)
    assert caught.value.key == key
