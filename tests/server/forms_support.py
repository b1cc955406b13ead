"""Helpers of the prompt-form tests: templates with the ids they must render to, and reference forwards
built by hand with Hugging Face (tiny random models)."""

from __future__ import annotations

import numpy as np
import torch

from lmaas_protocol import Candidate, EvaluateRequest, Example, LowRankOffset, ProjectionSpec, Tensor
from lmaas_runtime.loading import transformer_layers
from lmaas_server.budget import CallBudget
from tests.support.tiny_models import CAUSAL_KINDS, HIDDEN, MASKED_KINDS

TEXTS = ["the movie was great", "a bad film , boring and dull .", "it was terrible", "fun to watch", "thin plot"]

# name -> (template, family, the example's own ids before and after the prompt slot, built from the tokenizer
# alone: (ids of a string, the tokenizer, the text) -> (before, after)). Masked LMs: [CLS]/<s> ... [SEP]/</s>.
TEMPLATES = {
    "masked_front": (
        "{prompt} . {text_a} . It was {mask} .",
        "masked",
        lambda ids, tok, x: (
            [tok.cls_token_id],
            [*ids(f" . {x} . It was"), tok.mask_token_id, *ids(" ."), tok.sep_token_id],
        ),
    ),
    "masked_mid": (
        "{text_a} . {prompt} It was {mask} .",
        "masked",
        lambda ids, tok, x: (
            [tok.cls_token_id, *ids(f"{x} . ")],
            [*ids(" It was"), tok.mask_token_id, *ids(" ."), tok.sep_token_id],
        ),
    ),
    "masked_back": (  # the mask before the prompt
        "{mask} : {text_a} {prompt}",
        "masked",
        lambda ids, tok, x: ([tok.cls_token_id, tok.mask_token_id, *ids(f" : {x} ")], [tok.sep_token_id]),
    ),
    "causal_front": (
        "{prompt}Review: {text_a}\nSentiment:{mask}",
        "causal",
        lambda ids, tok, x: ([], ids(f"Review: {x}\nSentiment:")),
    ),
    "causal_suffix": (
        "Review: {text_a}\n{prompt}Sentiment:{mask}",
        "causal",
        lambda ids, tok, x: (ids(f"Review: {x}\n"), ids("Sentiment:")),
    ),
}
MASKED_TEMPLATES = ["masked_front", "masked_mid", "masked_back"]
CAUSAL_TEMPLATES = ["causal_front", "causal_suffix"]
KIND_TEMPLATES = [(k, t) for k in MASKED_KINDS for t in MASKED_TEMPLATES] + [
    (k, t) for k in CAUSAL_KINDS for t in CAUSAL_TEMPLATES
]
SUFFIX = TEMPLATES["causal_suffix"][0]
# Logits of these random tiny models are ~0.1 and the server reproduces hand-built forwards to ~1e-7; a
# misplaced deep prompt changes BERT's logits by only ~5e-6, so comparisons must be this tight to see it.
ATOL = 1e-6


def verbalizer(engine) -> list[list[int]]:
    words = [" bad", " great"] if engine.causal else ["bad", "great"]
    return [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in words]


def request(engine, candidates, template: str, texts=TEXTS, **extra) -> EvaluateRequest:
    return EvaluateRequest(
        template=TEMPLATES[template][0] if template in TEMPLATES else template,
        examples=[Example(text_a=t, label=i % 2) for i, t in enumerate(texts)],
        verbalizer=verbalizer(engine),
        candidates=candidates,
        **extra,
    )


def evaluate(engine, candidates, template: str, **extra) -> np.ndarray:
    """[candidates, examples, classes]"""
    response = engine.evaluate(request(engine, candidates, template, **extra), CallBudget(None))
    return np.stack([r.logits.to_numpy() for r in response.results])


def normal(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def t(array: np.ndarray) -> Tensor:
    return Tensor.from_numpy(array)


def table(engine) -> np.ndarray:
    return engine.loaded.model.get_input_embeddings().weight.detach().numpy()


def offset_candidate(a: np.ndarray, b: np.ndarray, scale: float, **fields) -> Candidate:
    return Candidate(embedding_offset=LowRankOffset(a=t(a), b=t(b), scale=scale), **fields)


def example_pieces(engine, template: str, text: str) -> tuple[list[int], list[int]]:
    """Token ids of the example before and after the prompt slot, built from the tokenizer alone."""
    tok = engine.loaded.tokenizer
    _, family, build = TEMPLATES[template]
    assert family == engine.loaded.family

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"] if s else []

    return build(ids, tok, text)


def reference(
    engine,
    template: str,
    text: str,
    base: np.ndarray,
    deep: dict[int, np.ndarray] | None = None,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """Class logits of one example by a plain HF forward: `base` [P, H] at the prompt positions, `deep[i]`
    added to the hidden states entering layer i there (by a pre-hook registered here), `offset` rows added in
    order to the example's own token embeddings (special tokens included, extra rows ignored)."""
    model = engine.loaded.model
    before, after = example_pieces(engine, template, text)
    prompt_length = base.shape[0]
    placed = before + [-1] * prompt_length + after
    label_at = len(placed) - 1 if engine.causal else placed.index(engine.loaded.tokenizer.mask_token_id)
    with torch.no_grad():
        own = model.get_input_embeddings()(torch.tensor(before + after, dtype=torch.long)).clone()
        if offset is not None:
            rows = min(len(own), offset.shape[0])
            own[:rows] += torch.from_numpy(offset[:rows])
        embeds = torch.cat([own[: len(before)], torch.from_numpy(base.copy()), own[len(before) :]]).unsqueeze(0)
        span = slice(len(before), len(before) + prompt_length)
        handles = []
        for index, values in (deep or {}).items():

            def add(module, args, kwargs, values=values):
                if args:
                    hidden = args[0].clone()
                    hidden[0, span] += torch.from_numpy(np.array(values))  # a writable copy of the decoded buffer
                    return (hidden, *args[1:]), kwargs
                hidden = kwargs["hidden_states"].clone()
                hidden[0, span] += torch.from_numpy(np.array(values))  # a writable copy of the decoded buffer
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(transformer_layers(model)[index].register_forward_pre_hook(add, with_kwargs=True))
        try:
            logits = model(inputs_embeds=embeds).logits[0, label_at]
        finally:
            for handle in handles:
                handle.remove()
    return np.array([logits[ids[0]].item() for ids in verbalizer(engine)])


def references(engine, template, base, deep=None, offset=None, texts=TEXTS) -> np.ndarray:
    return np.stack([reference(engine, template, text, base, deep, offset) for text in texts])


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    """Logits of random tiny models are small (BERT's are ~0.1): a change is anything far above float noise."""
    assert np.abs(a - b).max() > 1e-5, np.abs(a - b).max()


def empty(engine) -> np.ndarray:
    return np.zeros((0, engine.info.hidden_size), np.float32)


def spec(seed: int, dim: int, shape: list[int], scale: float = 0.05, distribution: str = "normal") -> ProjectionSpec:
    return ProjectionSpec(seed=seed, scale=scale, dim=dim, shape=shape, distribution=distribution)


def mixed_population(seed: int) -> list[Candidate]:
    """Every form the cached path takes, with mixed prompt lengths, plus one offset (plain path)."""
    return [
        Candidate(),
        Candidate(soft_prompt=t(normal(seed, 3, HIDDEN))),
        Candidate(prompt_token_ids=[5, 6]),
        Candidate(deep_prompt=[t(normal(seed + 1, 4, HIDDEN)), t(normal(seed + 2, 4, HIDDEN))]),
        Candidate(prompt_token_ids=[7], deep_prompt=[None, t(normal(seed + 3, 1, HIDDEN))]),
        Candidate(soft_prompt=t(normal(seed + 4, 6, HIDDEN)), deep_prompt=[None, t(normal(seed + 5, 6, HIDDEN))]),
        offset_candidate(
            normal(seed + 6, 8, 2), normal(seed + 7, 2, HIDDEN), 0.5, soft_prompt=t(normal(seed + 8, 2, HIDDEN))
        ),
    ]
