"""Registered example sets ("inputs"): rendered once, referenced by handle, evicted LRU.

Registering a set (template, examples, verbalizer) once saves resending and re-tokenizing it with every
evaluate request; for causal LMs with text before the prompt slot, the text's keys/values are cached with
it (`prefix_cache`). Memory is bounded by handle count and bytes; an evicted handle answers 410 (Gone), an
unknown one 404.

Handles are derived from the owner and the set's content, so registering the same set again returns the same
handle (and keeps its cached keys/values): a client that lost its handles (a crash, a resume) sends the very
same evaluate bodies again, which is what lets an Idempotency-Key replay them instead of charging twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from lmaas_protocol import ErrorCode, FieldError, InputsSpec
from lmaas_runtime.prefix import PrefixKV
from lmaas_runtime.rendering import RenderedExample, TemplateRenderer
from lmaas_runtime.rows import Verbalizer
from lmaas_server import metrics
from lmaas_server.errors import APIError, InvalidRequest

REMEMBERED_EVICTIONS = 4096


@dataclass
class Variant:
    """The examples rendered for one range of prompt lengths (truncation may depend on it)."""

    rendered: list[RenderedExample]
    prefix: PrefixKV | None = None


@dataclass(eq=False)
class PreparedInputs:
    spec: InputsSpec
    verbalizer: Verbalizer
    labels: np.ndarray | None
    handle: str | None = None
    owner: str | None = None
    variants: dict[tuple[int, int], Variant] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def variant(self, renderer: TemplateRenderer, longest: int, shortest: int) -> Variant:
        """Rendered examples for prompts of `shortest`..`longest` tokens (cached per range)."""
        with self.lock:
            key = (longest, shortest)
            if key not in self.variants:
                try:
                    rendered = renderer.render(
                        self.spec.template, self.spec.examples, longest, self.spec.truncate, shortest
                    )
                except FieldError as exc:
                    raise InvalidRequest(exc.param, exc.reason) from None
                same = [v for v in self.variants.values() if v.rendered == rendered]
                self.variants[key] = same[0] if same else Variant(rendered)  # share the prefix cache too
            return self.variants[key]

    @property
    def nbytes(self) -> int:
        tokens = sum(len(e.ids) for v in self.variants.values() for e in v.rendered) * 8
        return tokens + sum(v.prefix.nbytes for v in self.variants.values() if v.prefix is not None)


class InputsStore:
    def __init__(self, max_handles: int, max_bytes: int):
        self.max_handles = max_handles
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, PreparedInputs] = OrderedDict()
        self._evicted: deque[str] = deque(maxlen=REMEMBERED_EVICTIONS)
        self._lock = threading.Lock()

    def add(self, prepared: PreparedInputs) -> str:
        """Store `prepared` under its content handle; an identical set already stored is kept as it is."""
        digest = hashlib.blake2b(prepared.spec.model_dump_json().encode(), digest_size=18,
                                 key=(prepared.owner or "").encode()[:64])  # fmt: skip
        handle = "inp_" + digest.hexdigest()
        prepared.handle = handle
        with self._lock:
            if handle in self._items:
                self._items.move_to_end(handle)
            else:
                self._items[handle] = prepared
                self._evict()
        return handle

    def get(self, handle: str, owner: str | None = None) -> PreparedInputs:
        with self._lock:
            prepared = self._items.get(handle)
            if prepared is not None and prepared.owner == owner:
                self._items.move_to_end(handle)
                metrics.cache_event("inputs", hit=True)
                return prepared
            metrics.cache_event("inputs", hit=False)
            if handle in self._evicted:
                raise APIError(
                    ErrorCode.GONE,
                    f"inputs {handle} were evicted from the server's cache; register them again (POST /v1/inputs)",
                    param="inputs",
                )
        raise APIError(
            ErrorCode.NOT_FOUND, f"no inputs with handle {handle}; register them with POST /v1/inputs", param="inputs"
        )

    def delete(self, handle: str, owner: str | None = None) -> None:
        with self._lock:
            prepared = self._items.get(handle)
            if prepared is None or prepared.owner != owner:
                raise APIError(ErrorCode.NOT_FOUND, f"no inputs with handle {handle}", param="handle")
            del self._items[handle]

    def enforce_bounds(self) -> None:
        """Re-apply the byte bound after an entry grew (a prefix cache was computed)."""
        with self._lock:
            self._evict()

    def _evict(self) -> None:
        while len(self._items) > self.max_handles or (
            len(self._items) > 1 and sum(p.nbytes for p in self._items.values()) > self.max_bytes
        ):
            handle, _ = self._items.popitem(last=False)
            self._evicted.append(handle)

    def __len__(self) -> int:
        return len(self._items)
