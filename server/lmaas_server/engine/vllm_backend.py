"""The vLLM backend: rows scored by a separate `vllm serve` process over its OpenAI-compatible completions API.

What vLLM gets per row (causal LMs only; the label is read at the last position, so one decode step suffices):
- discrete prompts (BDPL), manual and in-context prompts, no prompt at all: the token ids
  (`prompt: [[ids]]`), so vLLM's automatic prefix caching reuses the text they share;
- input-layer soft prompts (BBT, `deep_prompt[0]`) and DePT embedding offsets, before or after the text: the
  input embeddings [T, hidden] the transformers path would feed its model (`Forward.plain_embeds`, from the
  embedding table the gateway keeps), as `prompt_embeds` (base64 of `torch.save` of the tensor, the encoding
  vLLM's completions API decodes; only the gateway builds these bytes, never a client: lmaas keeps its own
  validated wire format outside);
- refused with 422: per-layer deep prompts (BBTv2's `deep_prompt[i]`, i >= 1), which vLLM has no way to add
  inside its layers.

Each request asks for one token (`max_tokens=1`) with the label words' values at that position
(`logprob_token_ids`); vLLM must run with `--logprobs-mode raw_logits` so they are the model's logits, as the
transformers backend returns (`checks.backend_matches` compares both at start-up and refuses to serve if not).
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch

from lmaas_protocol import Candidate
from lmaas_runtime import FrozenLM, ModelError, Row
from lmaas_runtime.rows import RowPrompt, Verbalizer, with_prompt_tokens
from lmaas_server.config import Settings
from lmaas_server.errors import BackendUnavailable, InvalidRequest

log = logging.getLogger(__name__)

MAX_LABEL_IDS = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS: label-word ids one request may ask values for
ROUND_TOKENS = 1 << 22  # a scheduler round is one `run` call; vLLM batches the rows itself
REASON_CHARS = 300  # how much of vLLM's error message is passed on


class VLLMBackend:
    name = "vllm"
    prefix_cache = False  # vLLM caches prefixes itself (token-id prompts); the gateway keeps no keys/values
    round_tokens = ROUND_TOKENS

    def __init__(self, loaded: FrozenLM, settings: Settings, transport: httpx.BaseTransport | None = None):
        if not settings.vllm_url:
            raise ModelError("the vLLM backend needs vllm_url (--vllm-url or LMAAS_VLLM_URL)")
        if not loaded.causal:
            raise ModelError(f"the vLLM backend serves causal LMs; {loaded.name} is a masked LM")
        self.loaded = loaded
        self.url = settings.vllm_url.rstrip("/")
        self.per_request = settings.vllm_prompts_per_request
        self.client = httpx.Client(base_url=self.url, timeout=settings.vllm_timeout_s, transport=transport,
                                   limits=httpx.Limits(max_connections=settings.vllm_concurrency))  # fmt: skip
        self.pool = ThreadPoolExecutor(settings.vllm_concurrency, thread_name_prefix="lmaas-vllm")
        self.model, max_model_len = self._wait_for_model(settings.vllm_model, settings.vllm_startup_timeout_s)
        self.max_length = max_model_len - 1 if max_model_len else None  # room for the one decoded token
        self.embeds = self._serves_embeds()
        log.info("vLLM backend: %s at %s (max_model_len %s, prompt embeds %s)", self.model, self.url,
                 max_model_len, "on" if self.embeds else "off")  # fmt: skip

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # ------------------------------------------------------------------------------------------- checks

    def check_candidate(self, candidate: Candidate, param: str) -> None:
        deep = candidate.deep_prompt or ()
        layers = [i for i, entry in enumerate(deep) if entry is not None and i >= 1]
        if layers:
            raise InvalidRequest(f"{param}.deep_prompt", f"per-layer deep prompts (layers {layers[:5]}, as BBTv2 "
                                 "sends) are not served by the vLLM backend: vLLM takes input embeddings only; use a "
                                 "server with the transformers backend")  # fmt: skip
        soft = candidate.soft_prompt is not None or (deep and deep[0] is not None)
        if not self.embeds and (soft or candidate.embedding_offset is not None):
            form = "embedding_offset (DePT)" if candidate.embedding_offset is not None else "soft_prompt"
            raise InvalidRequest(f"{param}.{form.split()[0]}", f"{form} needs prompt embeddings, which this server's "
                                 "vLLM backend does not accept (vllm serve without --enable-prompt-embeds); token-id "
                                 "prompts are served")  # fmt: skip

    def check_verbalizer(self, ids: Sequence[Sequence[int]], param: str) -> None:
        unique = len({int(i) for row in ids for i in row})
        if unique > MAX_LABEL_IDS:
            raise InvalidRequest(param, f"{unique} label-word ids; the vLLM backend scores at most {MAX_LABEL_IDS}")

    # ------------------------------------------------------------------------------------------- scoring

    def run(self, rows: Sequence[Row]) -> None:
        """Score the rows: one completions request per (verbalizer, prompt kind, chunk), sent concurrently."""
        groups: dict[tuple[int, bool], list[Row]] = {}
        for row in rows:
            groups.setdefault((id(row.verbalizer), needs_embeds(row.prompt)), []).append(row)
        jobs = []
        for (_, embeds), members in groups.items():
            for start in range(0, len(members), self.per_request):
                chunk = members[start : start + self.per_request]
                jobs.append(self.pool.submit(self._score, chunk, embeds))
        for job in jobs:
            job.result()  # the first failure is the batch's (the scheduler fails its rows' requests)

    def _score(self, rows: list[Row], embeds: bool) -> None:
        verbalizer: Verbalizer = rows[0].verbalizer
        words = sorted({int(i) for i in verbalizer.index.flatten().tolist()})
        body = {"model": self.model, "max_tokens": 1, "temperature": 0.0, "logprobs": len(words),
                "logprob_token_ids": words, "return_tokens_as_token_ids": True, "add_special_tokens": False}  # fmt: skip
        if embeds:
            body["prompt_embeds"] = self._embeds(rows)
        else:
            body["prompt"] = [self._ids(row) for row in rows]
        values = word_values(self._post("/v1/completions", body), words, len(rows))  # [B, n]
        column = {word: j for j, word in enumerate(words)}
        index = np.vectorize(column.__getitem__)(verbalizer.index.cpu().numpy())  # [C, W] columns of `values`
        class_logits = verbalizer.reduce(torch.from_numpy(values[:, index]))  # [B, C, W] -> [B, C]
        for row, out in zip(rows, class_logits.numpy(), strict=True):
            row.out[:] = out

    def _ids(self, row: Row) -> list[int]:
        if row.prompt.deep:
            raise RuntimeError("a deep prompt reached the vLLM backend (check_candidate refuses them)")
        ids = with_prompt_tokens(row.example, row.prompt)
        self._check_label_last(row, len(ids))
        return ids

    def _embeds(self, rows: list[Row]) -> list[str]:
        """Each row's input embeddings [T, hidden] as base64 of torch.save (vLLM casts them to its dtype)."""
        if any(row.prompt.deep for row in rows):
            raise RuntimeError("a deep prompt reached the vLLM backend (check_candidate refuses them)")
        embeds, lengths = self.loaded.forward.plain_embeds(rows)  # [B, T, H], right-padded
        encoded = []
        for b, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            self._check_label_last(row, length)
            encoded.append(encode_embeds(embeds[b, :length]))
        return encoded

    @staticmethod
    def _check_label_last(row: Row, length: int) -> None:
        """vLLM returns the next-token values after the last position: the label must be read there (causal
        templates end at {mask}, so it always is)."""
        if row.example.label_position(row.prompt.length, True) != length - 1:
            raise RuntimeError("the label position is not the last one; the vLLM backend reads only the last")

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"vLLM at {self.url} did not answer ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise BackendUnavailable(f"vLLM answered {response.status_code}: {response.text[:REASON_CHARS]}")
        return response.json()

    # ------------------------------------------------------------------------------------------- start-up

    def _wait_for_model(self, wanted: str | None, timeout: float) -> tuple[str, int | None]:
        """The served model's name and max_model_len, waiting for vLLM to load (GET /v1/models)."""
        deadline, last = time.monotonic() + timeout, "no answer yet"
        while time.monotonic() < deadline:
            try:
                response = self.client.get("/v1/models")
                if response.status_code == 200:
                    return self._pick(response.json().get("data", []), wanted)
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(2)
        raise ModelError(f"vLLM at {self.url} did not answer GET /v1/models within {timeout:.0f} s ({last})")

    def _pick(self, models: list[dict], wanted: str | None) -> tuple[str, int | None]:
        names = [m.get("id") for m in models]
        if wanted is None and len(models) == 1:
            return names[0], models[0].get("max_model_len")
        for model in models:
            if model.get("id") == wanted:
                return wanted, model.get("max_model_len")
        raise ModelError(f"vLLM at {self.url} serves {names}; set vllm_model (--vllm-model) to one of them")

    def _serves_embeds(self) -> bool:
        """Does vLLM accept prompt embeddings (`--enable-prompt-embeds`)? One tiny request tells."""
        embedding = self.loaded.embedding.weight[:1].detach()  # [1, H]
        body = {"model": self.model, "max_tokens": 1, "prompt_embeds": [encode_embeds(embedding)]}
        try:
            self._post("/v1/completions", body)
        except BackendUnavailable as exc:
            if "prompt_embeds" not in exc.message and "prompt-embeds" not in exc.message:
                raise ModelError(f"vLLM at {self.url} failed a probe request: {exc.message}") from None
            log.warning("vLLM refuses prompt embeddings (%s): soft prompts and DePT offsets get 422", exc.message)
            return False
        return True


def encode_embeds(embeds: torch.Tensor) -> str:
    """[T, hidden] as vLLM's completions API decodes `prompt_embeds`: base64 of `torch.save` of the tensor."""
    buffer = io.BytesIO()
    torch.save(embeds.cpu().clone(), buffer)  # clone: a view would save the whole tensor it looks into
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def needs_embeds(prompt: RowPrompt) -> bool:
    """Soft values, embedding offsets or pure-soft placeholders (zeroed embeddings) go as prompt embeddings."""
    return prompt.soft is not None or prompt.offset is not None or (prompt.length > 0 and prompt.token_ids is None)


def word_values(response: dict, words: list[int], count: int) -> np.ndarray:
    """[count, len(words)] float32: each choice's values of `words` at its one generated position."""
    values = np.empty((count, len(words)), dtype=np.float32)
    choices = sorted(response.get("choices", []), key=lambda c: c["index"])
    if len(choices) != count:
        raise BackendUnavailable(f"vLLM answered {len(choices)} choices for {count} prompts")
    for b, choice in enumerate(choices):
        top = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        if top[0] is None:
            raise BackendUnavailable("vLLM answered without logprobs")
        try:
            values[b] = [top[0][f"token_id:{word}"] for word in words]
        except KeyError as exc:
            raise BackendUnavailable(f"vLLM left out the label word {exc.args[0]}") from None
    return values
