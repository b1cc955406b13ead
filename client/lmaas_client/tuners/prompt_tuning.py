"""White-box prompt tuning (Lester et al., 2021): a comparison baseline, never part of the API.

P soft tokens are trained with gradient descent on a *local copy of the served model* (the optional
`local` extra: torch + transformers), on the cross-entropy (or hinge) loss over the verbalizer logits of the
few-shot training set; everything else stays frozen. It therefore needs the same model locally:
`local_model` names it (default: the server's offline default, SmolLM2-135M-Instruct) and `setup` refuses
to train when it does not look like the served one (architecture, sizes, embedding std: `FrozenLM.mismatch`).

- Init from class-label embeddings (the paper's best): row c < classes is the mean embedding of class c's
  label word; the remaining rows are embeddings of tokens drawn from the first 5,000 vocabulary ids (the
  paper samples the 5,000 most common tokens; BPE ids are roughly frequency-ordered); "vocab" samples every
  row that way, "uniform" draws U[-std, std] with std the embedding std (the paper's U[-0.5, 0.5] suits
  T5's embedding scale, not a small model's).
- Optimizer: AdamW, lr 0.01 (default), or the paper's Adafactor (`optimizer="adafactor"`: lr 0.3, no
  parameter scaling, no relative step, no warm-up; AdamW is used if transformers lacks Adafactor). Measured
  on SmolLM2-135M (SST-2 seed 42, suffix placement, 6 epochs): Adafactor at 0.3 jumps around (train loss
  0.68 -> 0.94 after the first epoch, 0.29..0.55 later; with the prefix placement the first epoch took dev
  accuracy from 81 % to 59 %) because 0.3 is ~2x SmolLM2's embedding std of 0.136 (it was tuned for T5's
  much larger embeddings); AdamW at 0.01 (~0.07 std per step) descends smoothly (0.68 -> 0.20).
- Epochs over the shuffled training set (default 30 epochs, batches of 8: 120 steps on SST-2's 32 examples);
  after every epoch (and before the first) the prompt is scored on the dev set *locally* (no API calls);
  the best-on-dev epoch wins (ties: the lower dev loss). That prompt becomes `best`, a pure soft prompt
  (token_ids=None: it replaces the prompt embeddings, as it was trained). `ask()` returns [] and the runner
  scores `best` on the test set through the API, so it is compared on the same server as the other methods.
- A resumed run does not train again: the checkpoint's `best` is kept.

Rendering, injection and label reading are the server's own code (`lmaas_runtime.FrozenLM`, loaded by
`lmaas_client.local_model`), so the trained prompt means the same thing on the server; with a suffix placement on a causal LM the text before the
prompt is computed once and only the prompt and the answer cue run per step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmaas_client.prompts import PromptCandidate
from lmaas_client.tuners.base import Tuner, TunerConfig
from lmaas_protocol import scoring

ADAMW_LR = 0.01
ADAFACTOR_LR = 0.3  # Lester et al.
COMMON_TOKENS = 5000


class PromptTuningConfig(TunerConfig):
    prompt_length: int = Field(10, ge=1, le=4096, description="P soft tokens.")
    epochs: int = Field(30, ge=0, le=100_000, description="Passes over the training set.")
    batch_size: int = Field(8, ge=1, description="Training examples per gradient step.")
    optimizer: Literal["adamw", "adafactor"] = Field("adamw", description="adamw, or adafactor (the paper's).")
    lr: float | None = Field(None, gt=0, description="None: 0.3 for Adafactor (the paper), 0.01 for AdamW.")
    init: Literal["labels", "vocab", "uniform"] = Field("labels", description="How the prompt starts.")
    local_model: str | None = Field(
        None, description="The served model, loaded locally: hub id, folder or .gguf; None = the offline default."
    )
    device: str = Field("cpu", description="Where the local copy runs: cpu, cuda, auto.")
    cache_text: bool = Field(True, description="Causal LM, suffix placement: compute the text before the prompt once.")
    check_model: bool = Field(True, description="Refuse a local model that does not look like the served one.")


class PromptTuning(Tuner):
    name = "prompt-tuning"
    config_class = PromptTuningConfig
    config: PromptTuningConfig
    black_box = False

    def __init__(self, config: PromptTuningConfig, model):
        super().__init__(config, model)
        # per epoch: train loss (epoch 0: of the initial prompt; later: the mean over the epoch's steps), dev metric, dev CE
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0

    def setup(self, context) -> None:
        if context.resumed:
            return
        from lmaas_client.local_model import LocalModelError, load_local

        start = time.perf_counter()
        local = load_local(self.config.local_model, device=self.config.device)
        problem = local.mismatch(context.info) if self.config.check_model else None
        if problem:
            raise LocalModelError(
                f"prompt tuning trains on a local copy of the served model, and {problem}; "
                "pass local_model=<the server's model> (a hub id, folder or .gguf)"
            )
        template = context.scorer.template
        verbalizer = context.scorer.verbalizer
        words = context.task.label_words[local.family]
        self.train_prompt(local, template, verbalizer, words, context.train, context.dev, context.task.metric,
                          context.info.max_length)  # fmt: skip
        self.seconds = time.perf_counter() - start

    def train_prompt(self, local, template: str, verbalizer, words: Sequence[str], train, dev, metric: str = "accuracy",
                     max_length: int | None = None) -> None:  # fmt: skip
        """Train on `train`, select on `dev`; sets `best`, `best_loss` (train loss of `best`) and `history`."""
        import torch

        c = self.config
        if c.loss == "perf":
            raise ValueError("prompt tuning descends a gradient: use loss ce or hinge, not perf")
        length = c.prompt_length
        rng = np.random.default_rng(c.seed)
        generator = torch.Generator().manual_seed(c.seed)
        train_set = local.prepare(local.render(template, train, length, max_length=max_length), c.cache_text)
        dev_set = local.prepare(local.render(template, dev, length, max_length=max_length), c.cache_text)
        train_labels = torch.tensor([e.label for e in train], device=local.device)
        dev_labels = np.array([e.label for e in dev])
        prompt = torch.nn.Parameter(initial_prompt(local, c.init, length, words, rng, generator).float())
        optimizer = make_optimizer(c.optimizer, [prompt], c.lr)

        def evaluate(examples, labels: np.ndarray, loss: str = "ce") -> tuple[float, float]:
            with torch.no_grad():
                logits = batched_logits(local, examples, verbalizer, prompt, c.batch_size * 4).cpu().numpy()
            return scoring.score(metric, logits, labels), scoring.loss(loss, logits, labels, metric)

        dev_score, dev_loss = evaluate(dev_set, dev_labels)
        _, initial_loss = evaluate(train_set, train_labels.cpu().numpy(), c.loss)
        best = (dev_score, -dev_loss, prompt.detach().clone(), 0)
        self.history = [{"epoch": 0, "train_loss": initial_loss, "dev_score": dev_score, "dev_loss": dev_loss}]
        for epoch in range(1, c.epochs + 1):
            order = rng.permutation(len(train))
            running = []
            for s in range(0, len(order), c.batch_size):
                rows = order[s : s + c.batch_size].tolist()
                logits = local.class_logits(train_set.subset(rows), verbalizer, prompt)
                loss = torch_loss(c.loss, logits, train_labels[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running.append(loss.item())
            dev_score, dev_loss = evaluate(dev_set, dev_labels)
            self.history.append({"epoch": epoch, "train_loss": float(np.mean(running)), "dev_score": dev_score,
                                 "dev_loss": dev_loss})  # fmt: skip
            if (dev_score, -dev_loss) > best[:2]:
                best = (dev_score, -dev_loss, prompt.detach().clone(), epoch)
        prompt.data.copy_(best[2])
        _, self.best_loss = evaluate(train_set, train_labels.cpu().numpy(), c.loss)
        soft = best[2].cpu().numpy().astype(np.float32)
        self.best = PromptCandidate(soft=soft, meta={"method": "prompt-tuning", "best_epoch": best[3],
                                                     "local_dev_score": best[0], "local_model": local.name})  # fmt: skip

    def ask(self) -> list[PromptCandidate]:
        return []

    def update(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        raise ValueError("prompt tuning asks for nothing: it trains locally in setup()")

    def state_dict(self) -> dict[str, Any]:
        best = None if self.best is None else self.best.soft
        meta = {} if self.best is None else self.best.meta
        return {"best_soft": best, "best_meta": meta, "best_loss": self.best_loss, "history": self.history,
                "seconds": self.seconds}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        soft = state["best_soft"]
        self.best = (
            None if soft is None else PromptCandidate(soft=np.asarray(soft, dtype=np.float32), meta=state["best_meta"])
        )
        self.best_loss = state["best_loss"]
        self.history = list(state["history"])
        self.seconds = state["seconds"]


def initial_prompt(local, init: str, length: int, words: Sequence[str], rng: np.random.Generator, generator):
    """[P, hidden] from class-label embeddings (+ common-token embeddings), common tokens, or uniform noise."""
    import torch

    embed = local.embedding
    with torch.no_grad():
        if init == "uniform":
            noise = torch.rand(length, local.hidden_size, generator=generator) - 0.5
            return (noise * 2 * local.embedding_std).to(local.device)  # U[-std, std]
        rows = []
        if init == "labels":
            for word in words[:length]:
                ids = local.tokenizer(word, add_special_tokens=False)["input_ids"]
                rows.append(embed(torch.tensor(ids, device=local.device)).mean(dim=0))
        sampled = rng.choice(min(COMMON_TOKENS, local.vocab_size), size=length - len(rows), replace=False)
        if len(sampled):
            rows += list(embed(torch.tensor(sampled.tolist(), device=local.device)))
        return torch.stack(rows)


def make_optimizer(kind: str, params, lr: float | None):
    import torch

    if kind == "adafactor":
        try:
            from transformers.optimization import Adafactor
        except ImportError:  # pragma: no cover - transformers without Adafactor
            kind = "adamw"
        else:
            return Adafactor(
                params, lr=lr or ADAFACTOR_LR, scale_parameter=False, relative_step=False, warmup_init=False
            )
    return torch.optim.AdamW(params, lr=lr or ADAMW_LR, weight_decay=0.0)


def torch_loss(name: str, logits, labels):
    """The task loss on class logits [B, C] in torch (ce or hinge; perf is not differentiable)."""
    import torch

    if name == "ce":
        return torch.nn.functional.cross_entropy(logits, labels)
    if name == "hinge":
        gold = logits.gather(1, labels[:, None])
        margins = torch.clamp(logits - gold + 2.0, min=0.0)
        margins = margins.scatter(1, labels[:, None], 0.0)
        return margins.sum() / len(labels)
    raise ValueError(f"loss {name!r} is not differentiable: use ce or hinge for gradient-based tuning")


def batched_logits(local, examples, verbalizer, prompt, batch: int, token_ids=None):
    """Class logits of all `examples` (a Prepared set) in batches of `batch` rows."""
    import torch

    parts = [local.class_logits(examples.subset(range(s, min(s + batch, len(examples)))), verbalizer, prompt, token_ids)
             for s in range(0, len(examples), batch)]  # fmt: skip
    return torch.cat(parts)
