"""The six shipped tasks (sst2, mrpc, rte, snli, agnews, dbpedia), registered in `TASKS` on import.

Masked LMs follow BBT (RoBERTa-style label words with a leading space); causal LMs get an answer cue at the
end instead of a mask. See :mod:`lmaas_client.tasks.spec` for placements and the verbalizer.
"""

from __future__ import annotations

from lmaas_client.tasks.registry import register_task
from lmaas_client.tasks.spec import Placement, TaskSpec


# Causal templates, zero-shot on SmolLM2-135M-Instruct (empty prompt; train+dev of split 16-13, 64
# examples, dbpedia 112; prefix and suffix render the same tokens without a prompt): sst2 82.8 % acc, mrpc
# 55.9 F1 (53.1 % acc), rte 53.1 %, snli 29.7 %, agnews 65.6 %, dbpedia 80.4 %. Every class is predicted;
# the NLI tasks are at chance for such a small model whatever the wording (three SNLI wordings tried).
def _causal(body: str, cue: str) -> dict[Placement, str]:
    """Causal templates: prefix puts {prompt} first; suffix puts it after the text, right before the cue."""
    return {"prefix": "{prompt}" + body + cue + "{mask}", "suffix": body + "{prompt}" + cue + "{mask}"}


PAIR_MASKED: dict[Placement, str] = {  # BBT's MRPC/RTE/SNLI template: <P> . {s1} ? <mask> , {s2}
    "prefix": "{prompt} . {text_a} ? {mask} , {text_b}",
    "suffix": "{text_a} ? {mask} , {text_b} . {prompt}",
}

register_task(
    TaskSpec(
        name="sst2",
        instruction="Is the sentiment of this review positive or negative?\n",
        description="SST-2 movie-review sentiment (GLUE), 16 examples per class; test: GLUE dev (872)",
        label_names=("negative", "positive"),
        templates={
            "masked": {
                "prefix": "{prompt} . {text_a} . It was {mask} .",
                "suffix": "{text_a} . {prompt} It was {mask} .",
            },
            "causal": _causal("Review: {text_a}\n", "Sentiment:"),
        },
        label_words={"masked": (" bad", " great"), "causal": (" negative", " positive")},
    )
)

register_task(
    TaskSpec(
        name="mrpc",
        instruction="Do the two sentences mean the same thing?\n",
        description="MRPC paraphrase detection (GLUE), 16 examples per class; metric: F1 of 'equivalent'; "
        "test: GLUE dev (408)",
        label_names=("not_equivalent", "equivalent"),
        templates={
            "masked": dict(PAIR_MASKED),
            "causal": _causal('{text_a}\nQuestion: Does this mean the same as "{text_b}"? Yes or No?\n', "Answer:"),
        },
        label_words={"masked": (" No", " Yes"), "causal": (" No", " Yes")},
        metric="f1",
        text_fields=("text_a", "text_b"),
    )
)

register_task(
    TaskSpec(
        name="rte",
        instruction="Does the first text imply that the second is true?\n",
        description="RTE textual entailment (GLUE), 16 examples per class; test: GLUE dev (277)",
        label_names=("entailment", "not_entailment"),
        templates={
            "masked": dict(PAIR_MASKED),
            "causal": _causal('{text_a}\nBased on that, is it true that "{text_b}"? Yes or No?\n', "Answer:"),
        },
        label_words={"masked": (" Yes", " No"), "causal": (" Yes", " No")},
        text_fields=("text_a", "text_b"),
    )
)

register_task(
    TaskSpec(
        name="snli",
        instruction="Does the premise imply the hypothesis, contradict it, or neither?\n",
        description="SNLI natural language inference, 16 examples per class; test: e-SNLI test (9,824, "
        "PTB-tokenized), quick default: a fixed stratified 1,000",
        label_names=("entailment", "neutral", "contradiction"),
        templates={
            "masked": dict(PAIR_MASKED),
            "causal": _causal('{text_a}\nBased on that, is it true that "{text_b}"? Yes, No, or Maybe?\n', "Answer:"),
        },
        label_words={"masked": (" Yes", " Maybe", " No"), "causal": (" Yes", " Maybe", " No")},
        text_fields=("text_a", "text_b"),
        quick_test_size=1000,
    )
)

register_task(
    TaskSpec(
        name="agnews",
        instruction="Is this article about World, Sports, Business or Tech?\n",
        description="AG News topic classification, 16 examples per class; test: 7,600, quick default: a "
        "fixed stratified 1,000",
        label_names=("World", "Sports", "Business", "Tech"),
        templates={
            "masked": {"prefix": "{prompt} . {mask} News: {text_a}", "suffix": "{mask} News: {text_a} . {prompt}"},
            "causal": _causal("Article: {text_a}\n", "Topic:"),
        },
        label_words={
            "masked": (" World", " Sports", " Business", " Tech"),
            "causal": (" World", " Sports", " Business", " Tech"),
        },
        quick_test_size=1000,
    )
)

DBPEDIA_CLASSES = ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
                   "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork")  # fmt: skip
DBPEDIA_MASKED_WORDS = (" Company", " Education", " Artist", " Athlete", " Office", " Transportation", " Building",
                        " Natural", " Village", " Animal", " Plant", " Album", " Film", " Written")  # fmt: skip
# plainer nouns for causal LMs: 80 % zero-shot on SmolLM2 (112 train+dev examples) vs 73 % with the words above
DBPEDIA_CAUSAL_WORDS = (" Company", " School", " Artist", " Athlete", " Politician", " Vehicle", " Building",
                        " Nature", " Village", " Animal", " Plant", " Album", " Film", " Book")  # fmt: skip

register_task(
    TaskSpec(
        name="dbpedia",
        instruction="What kind of thing is this text about?\n",
        description="DBpedia ontology classification (14 classes), 16 examples per class; test: the "
        "256-example subsample of ordered-prompt's dev_subsample.jsonl (already small: no quick subsample). "
        "Multi-token label words (first sub-token used, SmolLM2): masked ' Athlete' (' Ath'), ' Album' "
        "(' Alb'); causal ' Athlete' (' Ath'), ' Politician' (' Polit'), ' Album' (' Alb')",
        label_names=DBPEDIA_CLASSES,
        templates={
            "masked": {
                "prefix": "{prompt} [ Category: {mask} ] {text_a}",
                "suffix": "[ Category: {mask} ] {text_a} . {prompt}",
            },
            "causal": _causal("Text: {text_a}\n", "Category:"),
        },
        label_words={
            "masked": DBPEDIA_MASKED_WORDS,
            "causal": DBPEDIA_CAUSAL_WORDS,
        },
    )
)
