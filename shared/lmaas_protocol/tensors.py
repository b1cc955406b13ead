"""Tensors on the wire: raw little-endian buffers with an explicit dtype and shape.

Never pickles: a payload is `{"dtype": "float32", "shape": [P, D], "data": "<base64>"}` and decoding is a
`numpy.frombuffer` with a fixed little-endian dtype, so a malicious payload can at worst be rejected.
Validation (byte length, finiteness) happens when the payload is parsed, so a bad tensor becomes a 4xx
error that names its field before any compute runs.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Literal

import numpy as np
from pydantic import Field, PrivateAttr, model_validator

from lmaas_protocol.base import FieldError, WireModel

# Explicit little-endian numpy dtypes, independent of the host's byte order.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
FLOAT_DTYPES = frozenset({"float32", "float16"})
MAX_TENSOR_NDIM = 4
MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024

WireDType = Literal["float32", "float16", "int32", "int64"]


class Tensor(WireModel):
    """A dense tensor: `data` is the base64 of `prod(shape) * itemsize` little-endian bytes (C order)."""

    dtype: WireDType = Field(description="Element type; all buffers are little-endian.")
    shape: list[int] = Field(
        min_length=0,
        max_length=MAX_TENSOR_NDIM,
        description="Dimensions, C order. Each dimension is >= 0.",
    )
    data: str = Field(description="Standard base64 of the raw little-endian buffer.")

    _array: np.ndarray | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _decode_and_check(self) -> Tensor:
        if any(d < 0 for d in self.shape):
            raise FieldError("shape", f"dimensions must be >= 0, got {self.shape}")
        count = math.prod(self.shape)
        if count > MAX_TENSOR_ELEMENTS:
            raise FieldError("shape", f"{count} elements exceed the limit of {MAX_TENSOR_ELEMENTS}")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FieldError("data", f"not valid base64 ({exc})") from None
        dtype = WIRE_DTYPES[self.dtype]
        if len(raw) != count * dtype.itemsize:
            raise FieldError(
                "data",
                f"{len(raw)} bytes do not match shape {self.shape} of {self.dtype} "
                f"({count * dtype.itemsize} bytes expected)",
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(self.shape)
        if self.dtype in FLOAT_DTYPES and not np.isfinite(array).all():
            raise FieldError("data", "contains NaN or Inf")
        self._array = array
        return self

    def to_numpy(self) -> np.ndarray:
        """The decoded array (read-only view of the validated buffer), in the wire dtype."""
        assert self._array is not None  # set by the validator
        return self._array

    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: WireDType | None = None) -> Tensor:
        """Encode `array` (cast to `dtype`, default: its own if it is a wire dtype)."""
        array = np.asarray(array)
        name = dtype or _wire_name(array.dtype)
        buffer = np.asarray(array, dtype=WIRE_DTYPES[name], order="C")  # keeps 0-d shapes, unlike ascontiguousarray
        return cls(dtype=name, shape=list(buffer.shape), data=base64.b64encode(buffer.tobytes()).decode())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (self.dtype, self.shape, self.data) == (other.dtype, other.shape, other.data)

    __hash__ = None  # mutable model, like other pydantic models

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize


def _wire_name(dtype: np.dtype) -> WireDType:
    for name, wire in WIRE_DTYPES.items():
        if np.dtype(dtype).kind == wire.kind and np.dtype(dtype).itemsize == wire.itemsize:
            return name  # type: ignore[return-value]
    if np.dtype(dtype).kind == "f":
        return "float32"
    raise ValueError(f"dtype {dtype} has no wire encoding; use one of {sorted(WIRE_DTYPES)}")
