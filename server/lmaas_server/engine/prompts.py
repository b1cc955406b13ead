"""Candidates from the wire to tensors on the model's device: raw or server-side projected.

Projection matrices A [d, prod(shape)] are materialized once per spec (the protocol's deterministic
generator) and kept in a byte-bounded LRU on the device; projected outputs A z are cached too, because
BBTv2 sends the same z for every frozen layer of every candidate of a generation.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np
import torch

from lmaas_protocol import Candidate, Projected, ProjectionSpec, Tensor, materialize
from lmaas_protocol.candidates import spec_of
from lmaas_runtime.rows import RowPrompt
from lmaas_server import metrics


class LRUCache:
    """A thread-safe LRU bounded by the total bytes of its torch tensors."""

    def __init__(self, max_bytes: int, name: str):
        self.max_bytes = max_bytes
        self.name = name  # the cache label in the metrics
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[object, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            metrics.cache_event(self.name, hit=value is not None)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return value

    def put(self, key: object, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()


class CandidateDecoder:
    def __init__(self, device: torch.device, dtype: torch.dtype, projection_cache_bytes: int):
        self.device = device
        self.dtype = dtype
        self.matrices = LRUCache(projection_cache_bytes, "projection_matrix")  # spec -> A [d, width] float32
        self.outputs = LRUCache(max(projection_cache_bytes // 16, 1 << 20), "projection_output")  # (spec, z) -> A z

    def decode(self, candidate: Candidate, projections: dict[str, ProjectionSpec] | None) -> RowPrompt:
        length = candidate.prompt_length(projections)
        soft = self._tensor(candidate.soft_prompt, projections)
        deep: dict[int, torch.Tensor] = {}
        for layer, entry in enumerate(candidate.deep_prompt or ()):
            if entry is None:
                continue
            values = self._tensor(entry, projections)
            if layer == 0:  # the word-embedding level, where soft_prompt also goes
                soft = values if soft is None else soft + values
            else:
                deep[layer] = values
        offset = None
        if candidate.embedding_offset is not None:
            low_rank = candidate.embedding_offset
            a, b = self._tensor(low_rank.a, projections), self._tensor(low_rank.b, projections)
            offset = (a.float() @ b.float() * low_rank.scale).to(self.dtype)  # [s, r] @ [r, hidden]
        return RowPrompt(length, candidate.prompt_token_ids, soft, deep, offset)

    def _tensor(self, value: Tensor | Projected | None, projections) -> torch.Tensor | None:
        if value is None:
            return None
        if isinstance(value, Tensor):
            array = np.array(value.to_numpy(), dtype=np.float32)  # a writable copy for torch
            return torch.from_numpy(array).to(self.device, self.dtype)
        spec = spec_of(value, projections)
        z = np.array(value.z.to_numpy(), dtype=np.float32)
        key = (spec.key(), hashlib.blake2b(z.tobytes(), digest_size=16).digest())
        projected = self.outputs.get(key)
        if projected is None:
            matrix = self.matrix(spec)
            projected = (torch.from_numpy(z).to(self.device) @ matrix).reshape(spec.shape).to(self.dtype)
            self.outputs.put(key, projected)
        return projected

    def matrix(self, spec: ProjectionSpec) -> torch.Tensor:
        matrix = self.matrices.get(spec.key())
        if matrix is None:
            matrix = torch.from_numpy(materialize(spec)).to(self.device)  # [d, width] float32
            self.matrices.put(spec.key(), matrix)
        return matrix
