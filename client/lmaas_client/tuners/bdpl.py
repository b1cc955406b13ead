"""BDPL (Diao et al., TMLR 2023): discrete prompts learned by a variance-reduced policy gradient.

The prompt has n positions (`prompt_length`; the paper: 10 for RoBERTa, 20 for GPT). Each position holds a
categorical distribution over the same N candidate tokens (`num_candidates`, the paper: 200). The
probabilities themselves are the parameters (no softmax), initialised uniform 1/N, kept on the simplex.

Candidate vocabulary (`setup`, through the API only: `tokenize(..., return_tokens=True)` of the training
texts, text_a and text_b; the tokenizer endpoint is free):
- PMI n-grams as the reference's `pmi_ngram.py`, on the server's tokens instead of whitespace words:
  count tokens and adjacent pairs within each text; keep those seen more than `ngram_min_count` times (5;
  the reference's strict `>`); a pair is "strong" when PMI = log(total_pairs * c(a,b) / (c(a) c(b))) >=
  `min_pmi` (1, the reference's default). Each text is cut into segments of tokens joined by strong
  pairs; segments of at most `max_ngram` tokens (5, the reference's default: longer segments are rare in
  few-shot data) seen more than `ngram_min_count` times are the n-grams. (The reference never counts
  the last segment of a text; we do.) Their occurrences anywhere in the texts are then counted again
  and those seen more than `ngram_min_count` times kept (the reference's `renew_ngram_by_freq`).
- Sorted by that count, descending, ties by the token ids ascending (deterministic: no dict order).
  Trailing tokens without a letter or digit are dropped from each n-gram (the reference strips trailing
  symbols, so a lone "." or "," never becomes a candidate); the rest are flattened in order to unique
  token ids and the first N kept.
- Tiny data (few n-grams pass the counts: SST-2's 32 sentences give 11 tokens with SmolLM2): the remaining places
  are filled with the most frequent single tokens that contain a letter or digit (count descending, id
  ascending). If the texts have fewer than N such tokens, the distribution is narrower (N = what there
  is); `vocab_info` says how many came from each source.
- Excluded everywhere (the server does not report which ids are special): tokens whose string looks like a
  special token, `<...>` (`<s>`, `<mask>`, `<|endoftext|>`, byte tokens `<0x0A>`) or `[UPPER]` (`[UNK]`,
  `[PAD]`, `[MASK]`), the model's mask token id, and tokens that are only whitespace once the tokenizers'
  space/newline markers (Ġ ▁ Ċ) are removed.
- Candidates are single tokens for every model family (the paper: 50 whole phrases for GPT); saved in `state_dict`.

Search (one API call per sampled prompt, the runner scores each on the whole training set):
- ask(): I = `num_samples` (20) prompts drawn from the per-position categoricals by inverse CDF with the
  tuner's own seeded `numpy.random.Generator` (never numpy's global RNG); a zero-probability token is
  never drawn.
- tell(losses): g = 1/(I-1) sum_k (L_k - mean L) d log P(prompt_k) / d p. For a categorical parameterised
  by its probabilities, d log p_ij / d p_ij = 1/p_ij at the sampled index j and 0 elsewhere. (The
  reference code puts -1/p_ij on the unsampled entries; since sum_k (L_k - mean L) = 0 that is exactly 2x
  this gradient, so with Adam only the clipping threshold differs.) 1/p uses max(p, 1e-8): a probability
  that the projection set to zero never gives inf/nan. The gradient's global norm is clipped to
  `clip_norm` (3, as torch's clip_grad_norm_, which the reference calls); one Adam step (beta 0.9/0.999,
  eps 1e-8, bias-corrected, as torch.optim.Adam; the reference's AdamW weight decay of 0.1 is left out:
  it scales the probabilities by 1 - lr * 0.1 per step, a no-op); then every row is projected onto the
  probability simplex exactly, with the sort-based algorithm (Duchi et al. 2008) instead of the
  reference's bisection (20 iterations, tolerance 1e-3: its rows only sum to 1 approximately).
- lr: the paper's 1e-4 for masked LMs is the default (GPT: 2e-4; the authors used 1e-3 for MRPC). Adam
  moves each probability by about lr per step, so with few hundred calls (tens of steps) and p = 1/200 the
  paper's lr barely changes the distribution; raise it for small budgets (`-o lr=...`). Measured on SST-2
  with SmolLM2, 200 calls = 10 steps: lr 1e-4 left every row within 0.001 of uniform (the argmax prompt is
  then tie-breaking noise); lr 1e-2 cut each row's entropy from 5.3 to ~3.5 nats (~40 live tokens).
  No learning-rate schedule (the reference builds one and never steps it).
- Losses come from the run's `loss` option (`scoring.loss`, whose hinge sign is correct; the reference
  inverts it).

Selection (`select`): "argmax" (default, the paper's evaluation): `best` is the prompt of the argmax token
per position of the current distribution (ties: the lowest index, i.e. the more frequent token), refreshed
after every observe/tell, so the runner's dev evaluation every `eval_every` calls scores the paper's
prompt; the same object is kept while the argmax does not change, so it is not scored twice.
"best_sampled": `best` is the lowest-train-loss prompt drawn so far. In both cases `best_loss` is the
lowest train loss of a drawn prompt (the argmax prompt itself is not scored on the training set), and the
best drawn prompt is stored by value (`best_sampled`), not by reference.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from lmaas_client.prompts import PromptCandidate
from lmaas_client.tuners.base import FLOOR_BY_DEFAULT, Tuner, TunerConfig
from lmaas_protocol import ModelInfo
from lmaas_protocol.candidates import MAX_PROMPT_TOKENS

if TYPE_CHECKING:
    from lmaas_client.context import TuneContext

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
PROB_FLOOR = 1e-8  # 1/p uses max(p, PROB_FLOOR)
SPACE_MARKERS = "Ġ▁Ċċ"  # byte-level BPE space/newline, SentencePiece space
SPECIAL_PATTERN = re.compile(r"^(<.*>|\[[A-Z_]+\])$", re.DOTALL)


class BDPLConfig(TunerConfig):
    manual_floor: bool = FLOOR_BY_DEFAULT
    prompt_length: int = Field(10, ge=1, le=MAX_PROMPT_TOKENS, description="n prompt positions (paper: 10; GPT: 20).")
    num_candidates: int = Field(200, ge=2, le=100_000, description="N candidate tokens per position (paper: 200).")
    num_samples: int = Field(20, ge=2, le=1024, description="I prompts sampled per step, one API call each.")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (paper: 1e-4; raise it for small budgets).")
    clip_norm: float = Field(3.0, gt=0, description="Gradient norm clipping (paper: 3).")
    best_from: Literal["argmax", "best_sampled"] = Field(
        "argmax", description="best = the argmax prompt (the paper) or the lowest-loss sampled prompt."
    )
    max_ngram: int = Field(5, ge=1, le=32, description="Longest PMI n-gram in tokens (reference: 5).")
    ngram_min_count: int = Field(5, ge=0, description="Tokens, pairs and n-grams must occur more often than this.")
    min_pmi: float = Field(1.0, description="Pairs with at least this PMI are joined into n-grams.")

    @model_validator(mode="before")
    @classmethod
    def _old_select_name(cls, data: Any) -> Any:
        """Before 2026-12-01 this field was `select`, which hid the dev selection mode every tuner shares; run
        folders of then still say select=argmax|best_sampled."""
        if isinstance(data, dict) and data.get("select") in ("argmax", "best_sampled"):
            data = {**data, "best_from": data["select"]}
            del data["select"]
        return data


class BDPLTuner(Tuner):
    name = "bdpl"
    config_class = BDPLConfig
    config: BDPLConfig

    def __init__(self, config: BDPLConfig, model: ModelInfo):
        super().__init__(config, model)
        if config.prompt_length > model.limits.max_prompt_length:
            raise ValueError(
                f"prompt_length {config.prompt_length} exceeds the server's max_prompt_length "
                f"{model.limits.max_prompt_length}"
            )
        self.rng = np.random.Generator(np.random.PCG64(config.seed))
        self.vocab: np.ndarray | None = None  # [N] token ids
        self.vocab_tokens: list[str] = []
        self.vocab_info: dict[str, int] = {}
        self.probs: np.ndarray | None = None  # [n, N]
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.step = 0
        self.best_sampled: PromptCandidate | None = None
        self._pending: np.ndarray | None = None  # [I, n] sampled indices of the last ask()

    # ------------------------------------------------------------------------------------------- vocabulary

    def setup(self, context: TuneContext) -> None:
        if context.resumed and self.vocab is not None:
            return  # the checkpoint holds the vocabulary and the distribution
        texts = [t for e in context.train for t in (e.text_a, e.text_b) if t]
        if not texts:
            raise ValueError("BDPL builds its candidate tokens from the training texts, and there are none")
        chunk = max(1, context.info.limits.max_examples)
        ids: list[list[int]] = []
        tokens: list[list[str]] = []
        for start in range(0, len(texts), chunk):
            response = context.client.tokenize(texts[start : start + chunk], return_tokens=True)
            ids += response.ids
            tokens += response.tokens or [[] for _ in response.ids]
        excluded = {context.info.mask_token_id} if context.info.mask_token_id is not None else set()
        c = self.config
        vocab, info = build_vocabulary(
            ids, tokens, c.num_candidates, c.max_ngram, c.ngram_min_count, c.min_pmi, excluded
        )
        strings = {i: s for row_ids, row in zip(ids, tokens, strict=True) for i, s in zip(row_ids, row, strict=False)}
        self.set_vocabulary(vocab, [strings.get(i, "") for i in vocab], info)

    def set_vocabulary(self, ids: Sequence[int], tokens: Sequence[str] | None = None, info: dict | None = None) -> None:
        """Use these candidate token ids (at most num_candidates) and restart from the uniform distribution."""
        ids = [int(i) for i in ids][: self.config.num_candidates]
        if not ids:
            raise ValueError("BDPL needs at least one candidate token; the training texts gave none")
        if len(set(ids)) != len(ids):
            raise ValueError("candidate token ids must be unique")
        self.vocab = np.asarray(ids, dtype=np.int64)
        self.vocab_tokens = list(tokens)[: len(ids)] if tokens is not None else [""] * len(ids)
        self.vocab_info = dict(info or {"given": len(ids)})
        shape = (self.config.prompt_length, len(ids))
        self.probs = np.full(shape, 1.0 / len(ids))
        self.m, self.v, self.step = np.zeros(shape), np.zeros(shape), 0
        self._pending = None
        self._refresh_best()

    # ------------------------------------------------------------------------------------------- ask/tell

    def ask(self) -> list[PromptCandidate]:
        probs = self._require_setup()
        samples = sample_rows(probs, self.config.num_samples, self.rng)
        self._pending = samples
        return [self.prompt(row) for row in samples]

    def update(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        values = np.asarray(losses, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"BDPL needs finite losses, got {values.tolist()}")
        grad = policy_gradient(self.probs, self._pending, values)
        grad = clip_norm(grad, self.config.clip_norm)
        self.step += 1
        self.m = BETA1 * self.m + (1 - BETA1) * grad
        self.v = BETA2 * self.v + (1 - BETA2) * grad * grad
        m_hat = self.m / (1 - BETA1**self.step)
        v_hat = self.v / (1 - BETA2**self.step)
        self.probs = project_simplex(self.probs - self.config.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS))
        self._refresh_best()

    def observe(self, candidates: Sequence[PromptCandidate], losses: Sequence[float]) -> None:
        for candidate, value in zip(candidates, losses, strict=True):
            if value < self.best_loss:  # a copy: later changes to the asked object do not touch it
                self.best_sampled, self.best_loss = copy.deepcopy(candidate), float(value)
        self._refresh_best()

    # ------------------------------------------------------------------------------------------- prompts

    def prompt(self, indices: Sequence[int]) -> PromptCandidate:
        """The prompt of one candidate index per position."""
        indices = [int(i) for i in indices]
        tokens = [self.vocab_tokens[i] for i in indices]
        return PromptCandidate(token_ids=[int(self.vocab[i]) for i in indices], meta={"prompt_tokens": tokens})

    def argmax_indices(self) -> np.ndarray:
        return self._require_setup().argmax(axis=1)

    def argmax_prompt(self) -> PromptCandidate:
        """The paper's evaluation prompt: the most probable token at each position."""
        return self.prompt(self.argmax_indices())

    def _refresh_best(self) -> None:
        if self.config.best_from == "best_sampled":
            self.best = self.best_sampled
        elif self.probs is not None:
            ids = [int(self.vocab[i]) for i in self.argmax_indices()]
            if self.best is None or self.best.token_ids != ids:  # same prompt: keep the object (scored once)
                self.best = self.argmax_prompt()

    def _require_setup(self) -> np.ndarray:
        if self.probs is None:
            raise RuntimeError("BDPL has no candidate vocabulary yet: call setup(context) or set_vocabulary()")
        return self.probs

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        best = self.best_sampled
        return {
            "vocab": None if self.vocab is None else self.vocab.copy(),
            "vocab_tokens": list(self.vocab_tokens),
            "vocab_info": dict(self.vocab_info),
            "probs": None if self.probs is None else self.probs.copy(),
            "m": None if self.m is None else self.m.copy(),
            "v": None if self.v is None else self.v.copy(),
            "step": self.step,
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "pending": None if self._pending is None else self._pending.copy(),
            "best_sampled": None
            if best is None
            else {"token_ids": list(best.token_ids), "meta": copy.deepcopy(best.meta)},
            "best_loss": self.best_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def array(value, dtype):
            return None if value is None else np.array(value, dtype=dtype, copy=True)

        self.vocab = array(state["vocab"], np.int64)
        self.vocab_tokens = list(state["vocab_tokens"])
        self.vocab_info = dict(state["vocab_info"])
        self.probs, self.m, self.v = (array(state[k], np.float64) for k in ("probs", "m", "v"))
        self.step = int(state["step"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._pending = array(state["pending"], np.int64)
        best = state["best_sampled"]
        self.best_sampled = (
            None
            if best is None
            else PromptCandidate(token_ids=list(best["token_ids"]), meta=copy.deepcopy(best["meta"]))
        )
        self.best_loss = float(state["best_loss"])
        self.best = None
        self._refresh_best()


# ----------------------------------------------------------------------------------------------- numerics


def sample_rows(probs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, n] indices, row i of each drawn from probs[i] by inverse CDF; zero-probability entries never."""
    uniform = rng.random((count, probs.shape[0]))
    samples = np.empty((count, probs.shape[0]), dtype=np.int64)
    for i, row in enumerate(probs):
        cdf = np.cumsum(row)
        picked = np.searchsorted(cdf, uniform[:, i] * cdf[-1], side="right")
        last = int(np.flatnonzero(row > 0)[-1])  # u * total rounding up to total: the last possible entry
        samples[:, i] = np.minimum(picked, last)
    return samples


def policy_gradient(probs: np.ndarray, samples: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """1/(I-1) sum_k (L_k - mean L) d log P(sample_k) / d probs, with d log p / d p = 1/max(p, floor)."""
    count, length = samples.shape
    advantage = (losses - losses.mean()) / (count - 1)
    rows = np.broadcast_to(np.arange(length), samples.shape)
    grad = np.zeros_like(probs)
    np.add.at(grad, (rows, samples), advantage[:, None] / np.maximum(probs[rows, samples], PROB_FLOOR))
    return grad


def clip_norm(grad: np.ndarray, max_norm: float) -> np.ndarray:
    """torch.nn.utils.clip_grad_norm_ on one tensor: scale by max_norm / (norm + 1e-6) when that is < 1."""
    norm = float(np.sqrt((grad * grad).sum()))
    scale = max_norm / (norm + 1e-6)
    return grad * scale if scale < 1 else grad


def project_simplex(x: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto {p >= 0, sum p = 1} (sort-based, exact; Duchi et al. 2008)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot project non-finite values onto the simplex")
    width = x.shape[-1]
    flat = x.reshape(-1, width)
    ordered = -np.sort(-flat, axis=1)
    excess = np.cumsum(ordered, axis=1) - 1.0
    positive = ordered - excess / np.arange(1, width + 1) > 0  # True on a prefix; index 0 always
    rho = width - 1 - np.argmax(positive[:, ::-1], axis=1)
    theta = excess[np.arange(len(flat)), rho] / (rho + 1)
    return np.maximum(flat - theta[:, None], 0.0).reshape(x.shape)


# ----------------------------------------------------------------------------------------------- vocabulary


def is_special(token: str) -> bool:
    """Looks like a special token (`<s>`, `<mask>`, `<0x0A>`, `[UNK]`) or is only whitespace."""
    return bool(SPECIAL_PATTERN.match(token)) or not token.strip(SPACE_MARKERS).strip()


def has_word(token: str) -> bool:
    """Has a letter or digit besides the space markers (which are letters to str.isalnum)."""
    return any(ch.isalnum() for ch in token if ch not in SPACE_MARKERS)


def pmi_ngrams(
    texts: Sequence[Sequence[int]], max_ngram: int, min_count: int, min_pmi: float
) -> list[tuple[tuple[int, ...], int]]:
    """The reference's PMI n-grams of token-id sequences, with their counts, most frequent first."""
    words: Counter = Counter()
    pairs: Counter = Counter()
    for text in texts:
        words.update(text)
        pairs.update(itertools.pairwise(text))
    total = sum(pairs.values())
    words = Counter({w: c for w, c in words.items() if c > min_count})
    strong = {
        (a, b)
        for (a, b), c in pairs.items()
        if c > min_count and a in words and b in words and math.log(total * c / (words[a] * words[b])) >= min_pmi
    }
    segments: Counter = Counter()
    for text in texts:
        if not text:
            continue
        current = [text[0]]
        for a, b in itertools.pairwise(text):
            if (a, b) in strong:
                current.append(b)
            else:
                segments[tuple(current)] += 1
                current = [b]
        segments[tuple(current)] += 1
    grams = {g for g, c in segments.items() if c > min_count and len(g) <= max_ngram}
    counts: Counter = Counter()
    for text in texts:
        for start in range(len(text)):
            for n in range(1, min(max_ngram, len(text) - start) + 1):
                gram = tuple(text[start : start + n])
                if gram in grams:
                    counts[gram] += 1
    kept = [(g, c) for g, c in counts.items() if c > min_count]
    return sorted(kept, key=lambda item: (-item[1], item[0]))


def build_vocabulary(
    ids: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[str]],
    size: int,
    max_ngram: int = 5,
    min_count: int = 5,
    min_pmi: float = 1.0,
    excluded: set[int] | None = None,
) -> tuple[list[int], dict[str, int]]:
    """Up to `size` unique candidate token ids: PMI n-grams flattened, then frequent single tokens."""
    excluded = set(excluded or ())
    strings: dict[int, str] = {}
    for row_ids, row in zip(ids, tokens, strict=True):
        if len(row) != len(row_ids):
            raise ValueError("tokenize returned token strings that do not match the ids")
        strings.update(zip(row_ids, row, strict=True))
    allowed = {i for i, s in strings.items() if i not in excluded and not is_special(s)}
    chosen: list[int] = []
    seen: set[int] = set()
    for gram, _ in pmi_ngrams(ids, max_ngram, min_count, min_pmi):
        gram = list(gram)
        while gram and not has_word(strings[gram[-1]]):  # the reference strips trailing symbols
            gram.pop()
        for token in gram:
            if token in allowed and token not in seen and len(chosen) < size:
                chosen.append(token)
                seen.add(token)
    from_ngrams = len(chosen)
    frequency = Counter(i for row in ids for i in row)
    for token, _ in sorted(frequency.items(), key=lambda item: (-item[1], item[0])):
        if len(chosen) >= size:
            break
        if token in allowed and token not in seen and has_word(strings[token]):
            chosen.append(token)
            seen.add(token)
    return chosen, {"from_ngrams": from_ngrams, "from_unigrams": len(chosen) - from_ngrams}
