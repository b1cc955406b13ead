"""Checkpoint files that cost what changed, not what the tuner holds.

A tuner's state can be large and mostly unchanged between generations: BBTv2 keeps one CMA-ES per layer
(a d x d covariance and its eigenbasis, 4.2 MB at d = 500, so 126 MB for SmolLM2's 30 layers) and tells
only one of them per generation. Every `bytes` value of at least `BLOB_MIN_BYTES` in the pickled payload is
therefore stored once, content-addressed, under ``checkpoint.blobs/<blake2b>``; the checkpoint file keeps
the hashes. A save writes the new blobs (fsynced), then replaces the checkpoint file atomically, then
deletes the blobs it no longer names, so a crash at any point leaves a complete previous or new checkpoint.
Hashing is skipped for the very `bytes` objects the previous save of the same file stored (a tuner that
caches the serialised state of its unchanged parts, as BBTv2 does, then costs one blob per save).

Loading never runs code named by the file. Run folders get shared (benchmarks commit them), so a checkpoint
is untrusted input: the unpickler resolves only the classes and functions a tuner's state is made of
(`ALLOWED`: pycma's strategy parts, numpy arrays and generators, lmaas' prompt types), refuses anything else
with `CheckpointError`, accepts only blob names that are digests, and checks each blob against its digest.
pycma evaluates option strings only through its own `safe_str` allow-list.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

BLOB_MIN_BYTES = 64 * 1024
BLOB_DIR_SUFFIX = ".blobs"
_BLOB_TAG = "lmaas-blob"
# Classes that checkpoints of earlier versions name by a module they have left: (old module, class) -> new
# module. Unpickling looks the class up where it lives now, so an old run folder still resumes.
MOVED_CLASSES: dict[tuple[str, str], str] = {
    ("lmaas_client.tuners.base", "PromptCandidate"): "lmaas_client.prompts",
    ("lmaas_client.tuners.base", "ProjectedZ"): "lmaas_client.prompts",
    ("lmaas_client.tuners.base", "LowRank"): "lmaas_client.prompts",
}
# path -> {id(value): (value, digest)} of the previous save; holding `value` keeps its id from being reused
_previous: dict[str, dict[int, tuple[bytes, str]]] = {}
_DIGEST = re.compile(r"[0-9a-f]{40}")

_CMA = {
    "cma.boundary_handler": {"BoundNone", "BoundTransform", "BoundPenalty"},
    "cma.evolution_strategy": {
        "CMAEvolutionStrategy",
        "_CMASolutionDict_functional",
        "_CMAStopDict",
        "_StopTolXStagnation",
        "_pass",
    },
    "cma.logger": {"CMADataLogger"},
    "cma.optimization_tools": {"BestSolution"},
    "cma.options_parameters": {"CMAOptions", "CMAParameters", "is_feasible"},
    "cma.recombination_weights": {"RecombinationWeights"},
    "cma.sampler": {"GaussFullSampler", "GaussDiagonalSampler"},
    "cma.sigma_adaptation": {"CMAAdaptSigmaCSA", "CMAAdaptSigmaTPA", "_TPAParameters"},
    "cma.transformations": {"DiagonalDecoding", "GenoPheno", "RoundIntegerVariables"},
    "cma.utilities.utils": {"BlancClass", "DictFromTagsInString", "ElapsedWCTime", "MoreToWrite", "SolutionDict"},
}
_NUMPY = {
    "numpy": {"dtype", "ndarray"},
    "numpy.linalg": {"eigh"},  # pycma keeps its eigen-solver as an attribute
    "numpy.random._pcg64": {"PCG64"},
    "numpy.random._pickle": {"__bit_generator_ctor", "__generator_ctor"},
    "numpy.random.bit_generator": {"SeedSequence", "__pyx_unpickle_SeedSequence"},
    **{f"numpy.{core}.{module}": names for core in ("core", "_core")
       for module, names in (("multiarray", {"_reconstruct", "scalar"}), ("numeric", {"_frombuffer"}))},
}  # fmt: skip
_LMAAS = {
    "lmaas_client.prompts": {"PromptCandidate", "ProjectedZ", "LowRank"},  # and their old names (MOVED_CLASSES)
    "lmaas_client.tuners.cmaes": {"SeededGaussian"},
    "lmaas_protocol.projection": {"ProjectionSpec"},
}
ALLOWED: dict[str, set[str]] = {**_CMA, **_NUMPY, **_LMAAS}
_SAFE_BUILTINS = {"set", "frozenset", "complex", "slice", "range", "bytearray"}


class CheckpointError(pickle.UnpicklingError):
    """A checkpoint that is not what lmaas writes: refused before anything in it runs."""


def save(path: Path, payload: Any) -> int:
    """Write `payload` to `path` (and its blob folder); return the bytes written (new blobs + the file)."""
    blob_dir = path.with_name(path.name + BLOB_DIR_SUFFIX)
    written = 0
    key = str(path.resolve())
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        pickler = _BlobPickler(handle, blob_dir, _previous.pop(key, {}))
        pickler.dump(payload)
        written += pickler.written
        handle.flush()
        os.fsync(handle.fileno())
        written += handle.tell()
    os.replace(tmp, path)
    _previous[key] = pickler.stored
    referenced = {digest for _, digest in pickler.stored.values()}
    if blob_dir.is_dir():
        for blob in blob_dir.iterdir():
            if blob.name not in referenced:
                blob.unlink(missing_ok=True)
    return written


def load(path: Path) -> Any:
    """The payload `save` wrote, resolving only `ALLOWED` globals (`CheckpointError` otherwise)."""
    with path.open("rb") as handle:
        return _BlobUnpickler(handle, path.with_name(path.name + BLOB_DIR_SUFFIX), str(path)).load()


def loads(data: bytes, source: str = "checkpoint data") -> Any:
    """Bytes pickled inside a checkpoint (e.g. a pycma strategy), under the same allow-list as `load`."""
    return _BlobUnpickler(io.BytesIO(data), None, source).load()


class _BlobPickler(pickle.Pickler):
    def __init__(self, handle, blob_dir: Path, known: dict[int, tuple[bytes, str]]):
        super().__init__(handle, protocol=pickle.HIGHEST_PROTOCOL)
        self.blob_dir, self.known, self.written = blob_dir, known, 0
        self.stored: dict[int, tuple[bytes, str]] = {}

    def persistent_id(self, obj: Any) -> tuple[str, str] | None:
        if type(obj) is not bytes or len(obj) < BLOB_MIN_BYTES:
            return None
        previous = self.known.get(id(obj))
        if previous is not None and previous[0] is obj:
            digest = previous[1]
        else:
            digest = hashlib.blake2b(obj, digest_size=20).hexdigest()
        target = self.blob_dir / digest
        if not target.exists():
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            staging = self.blob_dir / f".{digest}.tmp"
            with staging.open("wb") as handle:
                handle.write(obj)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, target)
            self.written += len(obj)
        self.stored[id(obj)] = (obj, digest)
        return (_BLOB_TAG, digest)


class _BlobUnpickler(pickle.Unpickler):
    def __init__(self, handle, blob_dir: Path | None, source: str):
        super().__init__(handle)
        self.blob_dir, self.source = blob_dir, source

    def find_class(self, module: str, name: str) -> Any:
        module = MOVED_CLASSES.get((module, name), module)  # an older checkpoint's name for a moved class
        allowed = name in _SAFE_BUILTINS if module == "builtins" else name in ALLOWED.get(module, ())
        if not allowed:
            raise CheckpointError(
                f"{self.source} names {module}.{name}, which a tuner checkpoint never holds: refusing to load it "
                "(checkpoints from other sources may run code; start a new run instead)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> bytes:
        if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == _BLOB_TAG and isinstance(pid[1], str)):
            raise CheckpointError(f"{self.source}: unknown persistent id {pid!r}")
        digest = pid[1]
        if self.blob_dir is None or not _DIGEST.fullmatch(digest):  # a name, never a path
            raise CheckpointError(f"{self.source}: invalid blob reference {digest!r}")
        try:
            data = (self.blob_dir / digest).read_bytes()
        except FileNotFoundError as exc:
            raise pickle.UnpicklingError(f"checkpoint blob {self.blob_dir / digest} is missing") from exc
        if hashlib.blake2b(data, digest_size=20).hexdigest() != digest:
            raise CheckpointError(f"checkpoint blob {self.blob_dir / digest} does not match its digest")
        return data
