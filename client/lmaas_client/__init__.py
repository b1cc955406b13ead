"""lmaas edge client: HTTP client, tasks and derivative-free tuners. Never imports torch."""

from lmaas_client.api import load_deployed, load_prompt, tune
from lmaas_client.client import DEFAULT_BASE_URL, LMaaSClient
from lmaas_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BudgetExhaustedError,
    LMaaSError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
)
from lmaas_client.peft_export import export_peft
from lmaas_client.predict import DeployedPrompt
from lmaas_client.tasks.hf import hf_task

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BudgetExhaustedError",
    "DeployedPrompt",
    "LMaaSClient",
    "LMaaSError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitedError",
    "ServerError",
    "__version__",
    "export_peft",
    "hf_task",
    "load_deployed",
    "load_prompt",
    "tune",
]
