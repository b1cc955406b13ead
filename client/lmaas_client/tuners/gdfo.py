"""GDFO (Han et al., Findings of ACL 2023): gradient descent and derivative-free optimization on one prompt.

Only the abstract is public ("introduce gradient descent into black-box tuning through knowledge
distillation", "integrate gradient descent and derivative-free optimization to optimize task-specific
continuous prompts in a harmonized manner"); this is *our reading* of it, not the authors' code:

- One shared low-dimensional prompt z in R^d (d = intrinsic_dim). The teacher (the served model, a black
  box) sees the prompt A z exactly as in BBT (same projection spec, same placeholder tokens, `ProjectedZ`
  candidates so the server projects); the *student*, a small local white-box LM (`student`, default the
  offline SmolLM2-135M-Instruct; the optional `local` extra), sees (A_s + scale * U V) z, its own fixed
  random projection A_s (BBT scaling with the student's embedding std, seed + 1) plus a learned low-rank
  correction.
- Each generation (the schedule; every step costs no extra API call):
  1. CMA-ES (pycma, as BBT) asks popsize z's; the runner scores them on the teacher (one call each) and
     tell() gets their losses *and* the teacher's label-word logits [train examples, classes];
  2. tell CMA-ES the losses;
  3. distil: `distill_steps` Adam steps on the student's trainable tensors over minibatches of
     (z, training example) pairs from the last `buffer_generations` generations, loss =
     tau^2 KL(softmax(teacher/tau) || softmax(student/tau)) + distill_ce_weight * CE(student, label);
  4. gradient descent on z through the student: from the CMA mean (or the generation's best z), `z_steps`
     steps on the student's task loss, each a normalised step of `z_lr` times CMA-ES's per-coordinate std
     (so the refined point sits within the search distribution's scale);
  5. inject the refined z into CMA-ES (`es.inject`): the next ask() returns it as one of the popsize
     candidates, so it is scored by the teacher within the same budget and CMA-ES weighs it by its real
     loss. Gradient steps start after `warmup_generations` generations of distillation.
- The student's trainable tensors (documented choice, cheap on CPU: the student LM itself stays frozen, so
  a backward pass only goes through activations): the low-rank correction U [d, r] (zeros at first) and
  V [r, P*hidden_s] (N(0, 1) at first; the correction is scale * U V with scale the projection's element
  std) of the student's projection, which learns to map z onto the student's prompt space the way the
  teacher responds to it, and an affine calibration of the student's class logits (W [C, C] = I, b = 0 at
  first), which absorbs the two models' different label biases.

The state (`state_dict`) holds CMA-ES (with its private generator and injected solutions), the student's
trainable tensors, Adam's state, the minibatch generator, the buffer and the history, so a resumed run
continues bit-identically (on the same machine and thread count). Compare with BBT at equal API calls:
the defaults are BBT's (d 500, 50 tokens, popsize 20, sigma 1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmaas_client.tuners.base import TunerConfig
from lmaas_client.tuners.bbt import BBTConfig, BBTTuner
from lmaas_client.tuners.projection import placeholder_tokens, projection_spec
from lmaas_protocol import ModelInfo, materialize


class GDFOConfig(BBTConfig):
    # not measured with GDFO: the shared default (off) rather than BBT's
    manual_floor: bool = TunerConfig.model_fields["manual_floor"]
    student: str | None = Field(
        None, description="Local student LM: hub id, folder or .gguf; None = the offline default (SmolLM2-135M)."
    )
    student_device: str = Field("cpu", description="Where the student runs: cpu, cuda, auto.")
    student_rank: int = Field(
        4, ge=1, le=256, description="Rank r of the learned correction of the student's projection."
    )
    share_projection: bool = Field(
        False, description="Use the teacher's projection for the student when their hidden sizes agree."
    )
    distill_steps: int = Field(4, ge=0, le=10_000, description="Adam steps on the student per generation.")
    distill_batch: int = Field(64, ge=1, description="(z, example) pairs per distillation step.")
    distill_lr: float = Field(0.05, gt=0, description="Adam learning rate of the student's tensors.")
    distill_temperature: float = Field(1.0, gt=0, description="tau of the distillation KL.")
    distill_ce_weight: float = Field(0.1, ge=0, description="Weight of the task CE in the student's loss.")
    buffer_generations: int = Field(
        2, ge=1, le=1000, description="Generations of teacher answers kept for distillation."
    )
    z_steps: int = Field(2, ge=0, le=1000, description="Gradient steps on z through the student per generation.")
    z_lr: float = Field(0.3, gt=0, description="z step length, in units of CMA-ES's per-coordinate std.")
    z_batch: int | None = Field(None, ge=1, description="Training examples per z step; None = all.")
    refine_from: Literal["mean", "best"] = Field(
        "mean", description="Start of the z steps: CMA mean or generation's best."
    )
    warmup_generations: int = Field(1, ge=1, description="Generations distilled before the first injection.")
    inject_force: bool = Field(
        False, description="Inject as is (True) or as a direction pycma may rescale to a sample's Mahalanobis length."
    )
    cache_text: bool = Field(True, description="Causal student, suffix placement: compute the text once.")


class GDFOTuner(BBTTuner):
    name = "gdfo"
    config_class = GDFOConfig
    config: GDFOConfig

    def __init__(self, config: GDFOConfig, model: ModelInfo):
        super().__init__(config, model)
        self.rng = np.random.default_rng([config.seed, 7])  # minibatches (saved in the state)
        self.generation = 0
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []  # per generation: z [K, d], teacher logits [K, N, C]
        self.history: list[dict[str, float]] = []
        self.injected: list[np.ndarray] = []  # every z handed to es.inject, in order
        self.student = None
        self._restore: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------------- setup

    def setup(self, context) -> None:
        """Load the student and render the training set for it (also on resume: the student is not saved)."""
        from lmaas_client.local_model import load_local

        student = load_local(self.config.student, device=self.config.student_device)
        self.attach(student, context.task, context.train, context.placement)

    def attach(self, student, task, train, placement: str) -> None:
        """Use `student` on `train` (setup() without a TuneContext; tests use it directly)."""
        import torch

        c = self.config
        self.student = student
        self.labels = torch.tensor([e.label for e in train], device=student.device)
        self.labels_np = np.array([e.label for e in train])
        template = task.template(student.family, placement)
        self.verbalizer = student.label_ids(task.label_words[student.family])
        rendered = student.render(template, train, c.prompt_length)
        self.examples = student.prepare(rendered, c.cache_text)
        self.student_tokens = placeholder_tokens(
            c.init_tokens, c.init_token_offset, c.prompt_length, student.vocab_size
        )
        if c.share_projection and student.hidden_size == self.model.hidden_size:
            spec = self.spec
        else:
            spec = projection_spec(c.intrinsic_dim, c.sigma, c.alpha, student.embedding_std, c.prompt_length,
                                   student.hidden_size, c.seed + 1)  # fmt: skip
        self.student_spec = spec
        self.projection = torch.from_numpy(materialize(spec)).to(student.device)  # [d, P * hidden_s]
        self.scale = float(spec.scale)
        classes = task.num_classes
        generator = torch.Generator().manual_seed(c.seed + 2)
        self.params = {
            "u": torch.zeros(c.intrinsic_dim, c.student_rank),
            "v": torch.randn(c.student_rank, self.projection.shape[1], generator=generator),
            "w": torch.eye(classes),
            "b": torch.zeros(classes),
        }
        self.params = {k: torch.nn.Parameter(v.to(student.device)) for k, v in self.params.items()}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=c.distill_lr)
        if self._restore is not None:
            self._apply_restore(self._restore)
            self._restore = None

    # -------------------------------------------------------------------------------------------- the student

    def student_prompts(self, z):
        """z [K, d] (torch) -> the student's soft prompts [K, P, hidden_s]."""
        p = self.params
        matrix = self.projection + self.scale * (p["u"] @ p["v"])
        return (z.float() @ matrix).reshape(z.shape[0], self.config.prompt_length, self.student.hidden_size)

    def student_logits(self, z, candidates: Sequence[int], examples: Sequence[int]):
        """Calibrated class logits [rows, C] for (candidate k, example i) rows; z is [K, d]."""
        prompts = self.student_prompts(z)[list(candidates)]  # [rows, P, hidden_s]
        raw = self.student.class_logits(
            self.examples.subset(list(examples)), self.verbalizer, prompts, self.student_tokens
        )
        return raw @ self.params["w"].T + self.params["b"]

    def distill(self) -> dict[str, float]:
        """Adam steps on the student's tensors: match the teacher's label distributions (+ the task CE)."""
        import torch
        import torch.nn.functional as F

        c = self.config
        zs = np.concatenate([z for z, _ in self.buffer])
        teacher = np.concatenate([logits for _, logits in self.buffer])  # [K, N, C]
        pairs = teacher.shape[0] * teacher.shape[1]
        z = torch.from_numpy(zs).float().to(self.student.device)
        teacher_t = torch.from_numpy(teacher).float().to(self.student.device)
        tau = c.distill_temperature
        losses = []
        for _ in range(c.distill_steps):
            picks = self.rng.choice(pairs, size=min(c.distill_batch, pairs), replace=False)
            ks, es_ = (picks // teacher.shape[1]).tolist(), (picks % teacher.shape[1]).tolist()
            student = self.student_logits(z, ks, es_)
            target = F.softmax(teacher_t[ks, es_] / tau, dim=-1)
            kl = F.kl_div(F.log_softmax(student / tau, dim=-1), target, reduction="batchmean") * tau * tau
            loss = kl + c.distill_ce_weight * F.cross_entropy(student, self.labels[es_])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(kl.item())
        return {"kl_first": losses[0], "kl_last": losses[-1]} if losses else {}

    def refine(self, start: np.ndarray) -> np.ndarray:
        """`z_steps` normalised gradient steps on z through the student, scaled by CMA-ES's stds."""
        import torch
        import torch.nn.functional as F

        c = self.config
        stds = torch.from_numpy(np.asarray(self.es.stds, dtype=np.float64)).float().to(self.student.device)
        z = torch.from_numpy(np.asarray(start, dtype=np.float64)).float().to(self.student.device)
        n = len(self.labels_np)
        for _ in range(c.z_steps):
            rows = (
                self.rng.choice(n, size=c.z_batch, replace=False).tolist()
                if c.z_batch and c.z_batch < n
                else list(range(n))
            )
            point = z.clone().requires_grad_(True)
            logits = self.student_logits(point[None, :], [0] * len(rows), rows)
            loss = F.cross_entropy(logits, self.labels[rows])
            (grad,) = torch.autograd.grad(loss, point)
            scaled = grad * stds
            norm = scaled.pow(2).mean().sqrt()
            if not torch.isfinite(norm) or norm == 0:
                break
            z = z - c.z_lr * stds * scaled / norm
        return z.detach().double().cpu().numpy()

    # -------------------------------------------------------------------------------------------- ask / tell

    def update(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        if logits is None or len(logits) != len(self._pending):
            raise ValueError("gdfo distils the teacher: tell() needs the label-word logits of every candidate")
        if self.student is None:
            raise RuntimeError("gdfo needs its student: call setup() (or attach()) before tell()")
        start = time.perf_counter()
        pending = [np.asarray(z, dtype=np.float64) for z in self._pending]
        record: dict[str, float] = {"generation": self.generation}
        if self.injected and self.generation > 0 and self._injected_last:
            # the injected solution is the first of this generation's candidates: where did it rank?
            record["injected_rank"] = float(np.argsort(np.argsort(losses))[0])
            record["injected_loss"] = float(losses[0])
        record["median_loss"] = float(np.median(losses))
        record["best_loss"] = float(np.min(losses))
        self.es.tell(pending, [float(v) for v in losses])
        self.buffer.append((np.stack(pending), np.stack([np.asarray(x, dtype=np.float32) for x in logits])))
        self.buffer = self.buffer[-self.config.buffer_generations :]
        record.update(self.distill())
        self.generation += 1
        self._injected_last = False
        if self.config.z_steps and self.generation >= self.config.warmup_generations:
            origin = self.es.mean if self.config.refine_from == "mean" else pending[int(np.argmin(losses))]
            refined = self.refine(np.array(origin, dtype=np.float64))
            self.es.inject([refined], force=self.config.inject_force)
            self.injected.append(refined)
            self._injected_last = True
            record["step_norm"] = float(np.linalg.norm(refined - np.asarray(origin)))
        record["seconds"] = time.perf_counter() - start
        self.history.append(record)

    _injected_last = False

    # -------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "gdfo_rng": self.rng.bit_generator.state,
            "generation": self.generation,
            "buffer": [(z.copy(), logits.copy()) for z, logits in self.buffer],
            "history": [dict(r) for r in self.history],
            "injected": [z.copy() for z in self.injected],
            "injected_last": self._injected_last,
            "student": self._student_state() if self.student is not None else (self._restore or {}).get("student"),
        })  # fmt: skip
        return state

    def _student_state(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu().numpy().copy() for k, v in self.params.items()},
            "optimizer": _to_numpy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["gdfo_rng"]
        self.generation = state["generation"]
        self.buffer = [(z.copy(), logits.copy()) for z, logits in state["buffer"]]
        self.history = [dict(r) for r in state["history"]]
        self.injected = [z.copy() for z in state["injected"]]
        self._injected_last = state["injected_last"]
        if self.student is not None:
            self._apply_restore(state)
        else:  # the runner restores before setup(): apply once the student is loaded
            self._restore = state

    def _apply_restore(self, state: dict[str, Any]) -> None:
        import torch

        saved = state.get("student")
        if saved is None:
            return
        with torch.no_grad():
            for key, value in saved["params"].items():
                self.params[key].copy_(torch.from_numpy(value))
        self.optimizer.load_state_dict(_to_torch(saved["optimizer"]))


def _to_numpy(value: Any) -> Any:
    """Tensors (e.g. in an optimizer's state dict) as numpy arrays, recursively."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return {"__tensor__": value.detach().cpu().numpy().copy()}
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_numpy(v) for v in value)
    return value


def _to_torch(value: Any) -> Any:
    import torch

    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return torch.from_numpy(value["__tensor__"].copy())
        return {k: _to_torch(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_torch(v) for v in value)
    return value
