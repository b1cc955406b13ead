"""Tensors on the wire: raw little-endian buffers with an explicit dtype and shape.

Never pickles. In a JSON body a tensor is `{"dtype": "float32", "shape": [P, D], "data": "<base64>"}`; in a
binary bundle body (`lmaas_protocol.bundle`) it is `{"dtype": ..., "shape": ..., "ref": i}`, the i-th raw
buffer of the bundle, which saves base64's third. Decoding is a `numpy.frombuffer` with a fixed
little-endian dtype, so a malicious payload can at worst be rejected. Validation (byte length, finiteness)
happens when the payload is parsed, so a bad tensor becomes a 4xx error naming its field before any compute.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, PrivateAttr, ValidationInfo, model_serializer, model_validator

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
BUFFERS_CONTEXT = "bundle_buffers"  # validation context key: the raw buffers of a bundle body
COLLECTOR_CONTEXT = "bundle_collector"  # serialization context key: where to put raw buffers

WireDType = Literal["float32", "float16", "int32", "int64"]


class Tensor(WireModel):
    """A dense tensor: `prod(shape) * itemsize` little-endian bytes (C order), inline or by reference."""

    dtype: WireDType = Field(description="Element type; all buffers are little-endian.")
    shape: list[int] = Field(
        min_length=0,
        max_length=MAX_TENSOR_NDIM,
        description="Dimensions, C order. Each dimension is >= 0.",
    )
    data: str | None = Field(None, description="Standard base64 of the raw buffer (JSON bodies).")
    ref: int | None = Field(None, ge=0, description="Index of the raw buffer in a binary bundle body.")

    _array: np.ndarray | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _decode_and_check(self, info: ValidationInfo) -> Tensor:
        if self._array is not None:  # built by from_numpy: already checked
            return self
        if any(d < 0 for d in self.shape):
            raise FieldError("shape", f"dimensions must be >= 0, got {self.shape}")
        count = math.prod(self.shape)
        if count > MAX_TENSOR_ELEMENTS:
            raise FieldError("shape", f"{count} elements exceed the limit of {MAX_TENSOR_ELEMENTS}")
        raw = self._raw_bytes(info.context or {})
        dtype = WIRE_DTYPES[self.dtype]
        if len(raw) != count * dtype.itemsize:
            where = "data" if self.ref is None else "ref"
            raise FieldError(
                where,
                f"{len(raw)} bytes do not match shape {self.shape} of {self.dtype} "
                f"({count * dtype.itemsize} bytes expected)",
            )
        self._array = _checked(np.frombuffer(raw, dtype=dtype).reshape(self.shape), self.dtype)
        return self

    def _raw_bytes(self, context: dict) -> bytes | memoryview:
        if (self.data is None) == (self.ref is None):
            raise FieldError("data", "give exactly one of data (base64) or ref (a bundle buffer)")
        if self.data is not None:
            try:
                return base64.b64decode(self.data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise FieldError("data", f"not valid base64 ({exc})") from None
        buffers = context.get(BUFFERS_CONTEXT)
        if buffers is None:
            raise FieldError("ref", "buffer references need a binary bundle body (application/x-lmaas-bundle)")
        if self.ref >= len(buffers):
            raise FieldError("ref", f"buffer {self.ref} does not exist; the bundle has {len(buffers)}")
        return buffers[self.ref]

    @model_serializer(mode="plain")
    def _serialize(self, info: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        collector = (info.context or {}).get(COLLECTOR_CONTEXT) if info is not None else None
        if collector is not None:
            out["ref"] = collector.add(self.to_numpy().tobytes())
        else:
            out["data"] = self.data if self.data is not None else base64.b64encode(self.to_numpy().tobytes()).decode()
        return out

    def to_numpy(self) -> np.ndarray:
        """The decoded array (read-only view of the validated buffer), in the wire dtype."""
        assert self._array is not None  # set by the validator or from_numpy
        return self._array

    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: WireDType | None = None) -> Tensor:
        """Encode `array` (cast to `dtype`, default: its own if it is a wire dtype). Raises on NaN/Inf."""
        array = np.asarray(array)
        name = dtype or _wire_name(array.dtype)
        buffer = np.asarray(array, dtype=WIRE_DTYPES[name], order="C")  # keeps 0-d shapes
        try:
            _checked(buffer, name)
        except FieldError as exc:
            raise ValueError(exc.reason) from None
        data = base64.b64encode(buffer.tobytes()).decode()
        tensor = cls.model_construct(dtype=name, shape=list(buffer.shape), data=data, ref=None)
        buffer = buffer.copy() if buffer is array else buffer
        buffer.flags.writeable = False
        tensor._array = buffer
        return tensor

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (self.dtype, self.shape) == (other.dtype, other.shape) and np.array_equal(
            self.to_numpy(), other.to_numpy()
        )

    __hash__ = None  # mutable model, like other pydantic models

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize


def _checked(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype in FLOAT_DTYPES and not np.isfinite(array).all():
        raise FieldError("data", "contains NaN or Inf")
    return array


def _wire_name(dtype: np.dtype) -> WireDType:
    for name, wire in WIRE_DTYPES.items():
        if np.dtype(dtype).kind == wire.kind and np.dtype(dtype).itemsize == wire.itemsize:
            return name  # type: ignore[return-value]
    if np.dtype(dtype).kind == "f":
        return "float32"
    raise ValueError(f"dtype {dtype} has no wire encoding; use one of {sorted(WIRE_DTYPES)}")
