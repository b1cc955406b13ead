"""lmaas wire protocol: schemas, tensor encoding, template slots and error codes (pydantic + numpy only)."""

from lmaas_protocol.base import FieldError, WireModel, error_message, error_param
from lmaas_protocol.bundle import BUNDLE_MEDIA_TYPE, BundleError, decode_bundle, encode_bundle, parse_bundle
from lmaas_protocol.candidates import Candidate, LowRankOffset, PromptTensor
from lmaas_protocol.deployed import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyText,
    PromptCalibration,
    PromptInfo,
    PromptList,
    PromptSpec,
)
from lmaas_protocol.errors import HTTP_STATUS, ErrorCode
from lmaas_protocol.metering import (
    KeyCreated,
    KeyCreateRequest,
    KeyDescription,
    LedgerRecord,
    TopUpRequest,
    UsageResponse,
)
from lmaas_protocol.projection import Projected, ProjectionSpec, materialize, project
from lmaas_protocol.schemas import (
    CandidateResult,
    ErrorDetail,
    ErrorResponse,
    EvaluateRequest,
    EvaluateResponse,
    Example,
    HealthResponse,
    InputsResponse,
    InputsSpec,
    LayerStdRequest,
    LayerStdResponse,
    ModelInfo,
    ServerLimits,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from lmaas_protocol.templates import SLOTS, Segment, parse_template
from lmaas_protocol.tensors import Tensor

__version__ = "0.1.0"
API_PREFIX = "/v1"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REQUEST_ID_HEADER = "X-Request-ID"

__all__ = [
    "API_PREFIX",
    "KeyCreateRequest",
    "KeyCreated",
    "KeyDescription",
    "LedgerRecord",
    "TopUpRequest",
    "UsageResponse",
    "BUNDLE_MEDIA_TYPE",
    "BundleError",
    "InputsResponse",
    "InputsSpec",
    "LayerStdRequest",
    "LayerStdResponse",
    "LowRankOffset",
    "PromptTensor",
    "Projected",
    "ProjectionSpec",
    "decode_bundle",
    "encode_bundle",
    "materialize",
    "parse_bundle",
    "project",
    "HTTP_STATUS",
    "IDEMPOTENCY_HEADER",
    "REQUEST_ID_HEADER",
    "SLOTS",
    "Candidate",
    "CandidateResult",
    "Classification",
    "ClassifyRequest",
    "ClassifyResponse",
    "ClassifyText",
    "PromptCalibration",
    "PromptInfo",
    "PromptList",
    "PromptSpec",
    "ErrorCode",
    "ErrorDetail",
    "ErrorResponse",
    "EvaluateRequest",
    "EvaluateResponse",
    "Example",
    "FieldError",
    "HealthResponse",
    "ModelInfo",
    "Segment",
    "ServerLimits",
    "Tensor",
    "TokenizeRequest",
    "TokenizeResponse",
    "Usage",
    "WireModel",
    "__version__",
    "error_message",
    "error_param",
    "parse_template",
]
