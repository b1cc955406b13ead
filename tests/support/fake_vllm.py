"""A small stand-in for `vllm serve`: the subset of vLLM's OpenAI-compatible API the lmaas vLLM backend uses.

GET /v1/models and POST /v1/completions with token-id prompts or `prompt_embeds` (base64 of torch.save, as
vLLM 0.32 decodes them in `renderers/embed_utils.py`), `max_tokens=1`, `logprob_token_ids` (with `logprobs`
equal to their count, as vLLM requires) and `return_tokens_as_token_ids`; the answer carries, per prompt, the
values of those tokens at the next position under "token_id:N" keys (`top_logprobs[0]`), computed with a
transformers model. `logprobs_mode` is vLLM's `--logprobs-mode`: "raw_logits" (what lmaas needs) or
"raw_logprobs" (vLLM's default). `embeds=False` answers 400 to prompt embeddings, as a vLLM started without
`--enable-prompt-embeds` does. Every request body is kept in `requests` for the tests to inspect.
"""

from __future__ import annotations

import base64
import io

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

MAX_MODEL_LEN = 128


def fake_vllm_app(model_dir: str, name: str = "tiny", logprobs_mode: str = "raw_logits", embeds: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    app = FastAPI()
    app.state.requests = []

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "max_model_len": MAX_MODEL_LEN}]}

    @app.post("/v1/completions")
    def completions(body: dict):
        app.state.requests.append(body)
        if body.get("model") != name:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        words = body.get("logprob_token_ids") or []
        if body.get("logprobs") != len(words) and words:
            return error(400, "When both logprobs and logprob_token_ids are set, logprobs must equal len(...)")
        if "prompt_embeds" in body:
            if not embeds:
                return error(400, "You must set `--enable-prompt-embeds` to input `prompt_embeds`.")
            inputs = [decode(item) for item in body["prompt_embeds"]]  # each [T, H]
        else:
            inputs = [model.get_input_embeddings()(torch.tensor(ids)) for ids in body["prompt"]]
        if body.get("max_tokens") != 1:
            return error(400, "this stand-in answers one token only")
        choices = []
        with torch.inference_mode():
            for index, embedded in enumerate(inputs):
                if embedded.shape[0] + 1 > MAX_MODEL_LEN:
                    return error(400, "This model's maximum context length is exceeded.")
                logits = model(inputs_embeds=embedded[None]).logits[0, -1].float()  # [V]
                values = logits if logprobs_mode == "raw_logits" else torch.log_softmax(logits, -1)
                top = {f"token_id:{w}": float(values[w]) for w in [int(values.argmax()), *words]}
                choices.append({"index": index, "text": "", "logprobs": {"top_logprobs": [top]}})
        return {"object": "text_completion", "model": name, "choices": choices[::-1]}  # any order: by index

    return app


def decode(item: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(item)), weights_only=True, map_location="cpu").float()


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status)
