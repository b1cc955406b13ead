"""A tuned prefix prompt as a PEFT prompt-tuning adapter (`lmaas export-peft`; the `peft` extra).

PEFT's prompt tuning puts `num_virtual_tokens` vectors before the word embeddings of the whole input. The
server, for a prefix prompt, runs [what the template puts before {prompt}] + [P prompt vectors] + [the rest
of the rendered example], where the first part holds no text of the example: the special tokens the
tokenizer puts first (RoBERTa's <s>, BERT's [CLS], a Llama tokenizer's BOS) and any literal template text
before {prompt}. The adapter's virtual tokens are therefore that part's embeddings followed by the P prompt
vectors (embed(token_ids) + soft for a soft prompt on tokens, as BBT sends it; the soft prompt alone for a
pure soft prompt; embed(token_ids) for a discrete prompt). Fed the rest of the rendered example (the
template after {prompt}, tokenized without the tokenizer's leading special tokens; a masked LM keeps its
closing ones), PEFT's model computes position for position what the server computes, so the label logits
agree (tests/client/test_peft_export.py checks 1e-4 on tiny models). `lmaas_prompt.json` beside the adapter
says which tokens the adapter holds and what to feed it.

Forms without a PEFT equivalent are refused before the base model is loaded, naming the form:
suffix placement (and any {prompt} after a text slot: PEFT's virtual tokens always come first), deep prompts
(BBTv2 adds a vector to the hidden states entering every layer; PEFT's prefix tuning adds keys and values,
a different function), DePT's embedding offsets (they change the text's own embeddings), and the empty
prompt (the manual prompt: use the template as text). Calibration is lost: PEFT has no class bias, so a
calibrated prompt's bias is written to `lmaas_prompt.json` for you to add to the label logits.

Server-side-projected prompts need no special handling here: prompt.npz stores every projected tensor
already computed (A z, with A from the protocol's generator), and a `PromptCandidate` is materialised
(`PromptCandidate.materialized`) before export. Nothing here imports torch or peft until an export runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmaas_client.prompt_io import load_prompt
from lmaas_client.prompts import PromptCandidate
from lmaas_protocol import Example, parse_template
from lmaas_protocol.templates import TEXT_SLOTS

if TYPE_CHECKING:
    from lmaas_runtime.frozen import FrozenLM

SIDECAR = "lmaas_prompt.json"
INSTALL_HINT = "exporting a PEFT adapter needs the `peft` extra: pip install 'lmaas-client[peft]'"


class ExportError(ValueError):
    """A prompt that cannot be exported (its form has no PEFT equivalent) or a base model that does not fit."""


@dataclass
class PeftExport:
    folder: Path
    virtual_tokens: int  # template tokens before the prompt + prompt length
    template_tokens: list[int]  # the token ids before the prompt, held by the adapter's first virtual tokens
    calibrated: bool  # the prompt carries a calibration the adapter cannot apply

    def notes(self) -> list[str]:
        """What a user of the adapter must know, one sentence each."""
        notes = [f"feed PEFT the template's text after {{prompt}}; its first {len(self.template_tokens)} token(s) "
                 f"(the tokenizer's leading special tokens and template text before the prompt) are in the "
                 f"adapter: tokenize without them"] if self.template_tokens else []  # fmt: skip
        if self.calibrated:
            notes.append(f"calibration is not in the adapter (PEFT has no class bias): add the bias in {SIDECAR} "
                         f"to the label-word logits yourself")  # fmt: skip
        return notes


def refusal(candidate: PromptCandidate, meta: dict[str, Any]) -> str | None:
    """Why this prompt has no PEFT prompt-tuning equivalent, or None (checks only the prompt: no model)."""
    if candidate.deep is not None and any(p is not None for p in candidate.deep):
        return ("a deep prompt (BBTv2: a vector added before every layer) has no PEFT prompt-tuning equivalent; "
                "PEFT's prefix tuning adds keys and values instead, a different function")  # fmt: skip
    if candidate.offset is not None:
        return "a DePT embedding offset changes the text's own embeddings; PEFT's prompt tuning cannot express it"
    if candidate.empty:
        return "the prompt is empty (the manual prompt): there is nothing to export; use the template as text"
    placement = meta.get("placement", "prefix")
    if placement != "prefix":
        return (f"a {placement} prompt sits after the text, but PEFT puts its virtual tokens before the whole "
                "input; only prefix prompts can be exported")  # fmt: skip
    template = meta.get("template")
    if not isinstance(template, str) or "{prompt}" not in template:
        return "the prompt file names no template with a {prompt} slot"
    before = []
    for segment in parse_template(template):
        if segment.kind == "slot" and segment.value == "prompt":
            break
        before.append(segment)
    if any(s.kind == "slot" and s.value in TEXT_SLOTS for s in before):
        return (f"the template {template!r} puts text of the example before {{prompt}}; PEFT puts its virtual "
                "tokens before the whole input")  # fmt: skip
    return None


def export_peft(
    prompt: str | Path, out: str | Path, base_model: str, *, device: str = "cpu", lm: FrozenLM | None = None
) -> PeftExport:
    """Write `prompt` (a prompt.npz) into `out` as a PEFT prompt-tuning adapter for `base_model` (a hub id or
    folder, as `PeftModel.from_pretrained(base, out)` will load it): adapter_config.json,
    adapter_model.safetensors and lmaas_prompt.json. `lm`: the base model already loaded (tests)."""
    candidate, meta = load_prompt(Path(prompt))
    return export_candidate(candidate, meta, out, base_model, device=device, lm=lm, source=str(prompt))


def export_candidate(candidate: PromptCandidate, meta: dict[str, Any], out: str | Path, base_model: str, *,
                     device: str = "cpu", lm: FrozenLM | None = None, source: str | None = None) -> PeftExport:  # fmt: skip
    """`export_peft` for a prompt in memory; `meta` as prompt.npz stores it (template, family, placement)."""
    if problem := refusal(candidate, meta):
        raise ExportError(f"{source or 'prompt'}: cannot export as a PEFT adapter: {problem}")
    candidate = candidate.materialized()  # projected tensors -> A z, as the server computes them
    try:
        import torch
        from peft import PromptTuningConfig, TaskType, get_peft_model
    except ImportError:
        raise ExportError(INSTALL_HINT) from None
    if lm is None:
        from lmaas_client.local_model import load_local

        lm = load_local(base_model, device=device)
    template_ids = _template_tokens(lm, candidate, meta)
    virtual = np.concatenate([_embed(lm, template_ids), _prompt_vectors(lm, candidate)])  # [n + P, hidden]
    task_type = TaskType.CAUSAL_LM if lm.causal else TaskType.FEATURE_EXTRACTION  # masked LM: logits of every position
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=len(virtual), token_dim=lm.hidden_size)
    model = get_peft_model(lm.model, config)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(virtual))
    model.peft_config["default"].base_model_name_or_path = base_model
    folder = Path(out)
    model.save_pretrained(str(folder))
    result = PeftExport(folder, len(virtual), template_ids, bool(meta.get("calibration")))
    sidecar = {"base_model": base_model, "tuned_on": meta.get("model"), "family": lm.family,
               "template": meta.get("template"), "placement": "prefix", "task": meta.get("task"),
               "method": meta.get("method"), "prompt_length": candidate.length, "virtual_tokens": len(virtual),
               "template_tokens_in_adapter": template_ids, "calibration": meta.get("calibration"),
               "notes": result.notes()}  # fmt: skip
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _template_tokens(lm: FrozenLM, candidate: PromptCandidate, meta: dict[str, Any]) -> list[int]:
    """The token ids the server puts before the prompt (the same for every example: `refusal` checked it)."""
    if meta.get("family") not in (None, lm.family):
        raise ExportError(f"the prompt was tuned on a {meta['family']} LM, but the base model is a {lm.family} LM")
    width = candidate.soft.shape[1] if candidate.soft is not None else lm.hidden_size  # type: ignore[union-attr]
    if width != lm.hidden_size:
        raise ExportError(f"the soft prompt is {width} wide, but the base model's hidden size is {lm.hidden_size}: "
                          f"export onto the model it was tuned on ({meta.get('model')})")  # fmt: skip
    if candidate.token_ids is not None and not all(0 <= t < lm.vocab_size for t in candidate.token_ids):
        raise ExportError(f"the prompt's token ids are not all in the base model's vocabulary ({lm.vocab_size})")
    probe = Example(text_a="probe", text_b="probe" if "{text_b}" in meta["template"] else None)
    rendered = lm.render(meta["template"], [probe], candidate.length)[0]
    return list(rendered.ids[: rendered.prompt_at])


def _embed(lm: FrozenLM, ids: list[int]) -> np.ndarray:
    """Word embeddings [len(ids), hidden] float32 as the model's embedding module computes them."""
    import torch

    with torch.no_grad():
        index = torch.tensor(ids, dtype=torch.long, device=lm.device)
        return lm.embedding(index).float().cpu().numpy().reshape(len(ids), lm.hidden_size)


def _prompt_vectors(lm: FrozenLM, candidate: PromptCandidate) -> np.ndarray:
    """[P, hidden]: embed(token_ids) + soft, the soft prompt alone, or embed(token_ids) (the runtime's rule)."""
    base = _embed(lm, candidate.token_ids) if candidate.token_ids is not None else 0.0
    soft = np.asarray(candidate.soft, dtype=np.float32) if candidate.soft is not None else 0.0
    return np.asarray(base + soft, dtype=np.float32).reshape(candidate.length, lm.hidden_size)
