"""Server settings: the only place that reads the environment (variables prefixed ``LMAAS_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from lmaas_protocol import schemas


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMAAS_", env_file=".env", extra="ignore")

    # Model
    model: str | None = Field(
        None, description="Hugging Face id, local folder or .gguf file; unset = the offline default (SmolLM2)."
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside a folder or hub repo given as model.")
    family: Literal["auto", "masked", "causal"] = "auto"
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    device_map: str | None = Field(
        None,
        description="Spread a model too large for one device over several: 'auto', 'balanced', 'sequential' "
        "(accelerate fills the GPUs, then host memory, then disk under cache_dir/offload) or a JSON object of "
        "module name -> device. Unset: the whole model on `device`.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="'auto' = bfloat16 on CPUs with bfloat16 instructions (avx512_bf16, amx_bf16), else "
        "float32; on GPUs bfloat16 where native (compute capability 8.0+), else float32 (float16 only when asked "
        "for: many models overflow in it).",
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's own).")
    cache_dir: Path = Field(Path.home() / ".cache" / "lmaas", description="Converted-model cache (GGUF).")

    # Backend: what runs the forward passes behind the gateway
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="'transformers': the model in this process; 'vllm': a `vllm serve` process at vllm_url scores "
        "the rows (this process keeps the tokenizer and weights on CPU to build prompt embeddings and check it).",
    )
    vllm_url: str | None = Field(None, description="Base URL of the vLLM server (e.g. http://vllm:8000), backend vllm.")
    vllm_model: str | None = Field(
        None, description="The model name vLLM serves (its --served-model-name); unset = the only one it lists."
    )
    vllm_timeout_s: float = Field(120.0, gt=0, description="Longest one HTTP request to vLLM may take.")
    vllm_startup_timeout_s: float = Field(
        900.0, gt=0, description="How long the gateway waits at start for vLLM to answer (it may still be loading)."
    )
    vllm_concurrency: int = Field(8, ge=1, description="HTTP requests in flight to vLLM at once.")
    vllm_prompts_per_request: int = Field(32, ge=1, description="Rows (prompts) per completions request to vLLM.")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    budget: int | None = Field(
        None, ge=0, description="Without API keys (--no-auth): calls this process may charge in all; unset = unlimited."
    )

    # Limits, checked before any compute and published at /v1/model.
    max_candidates: int = Field(64, ge=1, le=schemas.MAX_CANDIDATES)
    max_examples: int = Field(1024, ge=1, le=schemas.MAX_EXAMPLES)
    max_seq_len: int = Field(512, ge=8, description="Tokens per rendered example, prompt included.")
    max_prompt_length: int = Field(256, ge=0, le=schemas.MAX_PROMPT_TOKENS)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_batch_tokens: int | None = Field(
        None,
        ge=64,
        description="Padded tokens computed per forward pass; larger populations are split. Unset: 16384 on a "
        "CPU; on CUDA derived from the memory left free after loading the model.",
    )
    max_projection_elements: int = Field(
        1 << 28, ge=1, description="Largest d * prod(shape) of a server-side projection (float32 elements)."
    )
    projection_cache_bytes: int = Field(1 << 30, ge=0, description="Materialized projection matrices kept.")
    max_input_handles: int = Field(256, ge=1, description="Registered example sets kept (LRU).")
    input_cache_bytes: int = Field(2 << 30, ge=0, description="Bytes of registered inputs and their text caches.")
    prefix_cache: bool = Field(True, description="Reuse the keys/values of text before the prompt (causal LMs).")
    max_tokens_per_request: int = Field(
        4_000_000, ge=1, description="Tokens of rendered examples x candidates in one request."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Longest an evaluation may run; then 504, not charged.")
    max_classify_texts: int = Field(
        256, ge=1, le=schemas.MAX_EXAMPLES, description="Texts per POST /v1/classify (each charged one call)."
    )
    max_classify_chars: int = Field(
        8192, ge=1, le=schemas.MAX_TEXT_CHARS, description="Characters per text of POST /v1/classify."
    )
    max_prompts_per_key: int = Field(100, ge=1, description="Deployed prompts (POST /v1/prompts) one key may keep.")

    # Metering
    require_api_key: bool = Field(True, description="Every model endpoint needs `Authorization: Bearer <key>`.")
    database_url: str = Field(
        f"sqlite:///{Path.home() / '.local' / 'share' / 'lmaas' / 'lmaas.db'}",
        description="SQLAlchemy URL of the metering database: sqlite:///path or postgresql://user@host/db.",
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token of /v1/admin/*; unset = admin API off.")
    replica_id: str | None = Field(
        None,
        description="Names this replica in the ledger; a restart with the same id refunds its leftovers "
        "(default: host name and port).",
    )
    stale_reservation_s: float = Field(
        900.0, gt=0, description="Reservations older than this are refunded by any replica (> request timeout)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Server logs as text lines or JSON lines (each with the request id)."
    )
    prometheus_multiproc_dir: Path | None = Field(
        None, description="Enables Prometheus multiprocess mode (several uvicorn workers)."
    )
