"""Checkpoint files write what changed: large unchanged values are kept as content-addressed blobs, and a crash
at any point of a save leaves a checkpoint that loads."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from lmaas_client import checkpoints
from lmaas_client.tuners import make_tuner
from tests.client.test_tuners_methods import fake_model

BIG = checkpoints.BLOB_MIN_BYTES


def blobs(path: Path) -> set[str]:
    folder = path.with_name(path.name + checkpoints.BLOB_DIR_SUFFIX)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_round_trip_keeps_small_values_inline_and_large_bytes_as_shared_blobs(tmp_path: Path):
    path = tmp_path / "checkpoint.pkl"
    layer = os.urandom(BIG)
    payload = {"layers": [layer, layer, os.urandom(BIG)], "small": b"x" * 100, "z": np.arange(5.0), "n": 3}
    written = checkpoints.save(path, payload)
    loaded = checkpoints.load(path)
    assert loaded["layers"] == payload["layers"] and loaded["small"] == payload["small"] and loaded["n"] == 3
    np.testing.assert_array_equal(loaded["z"], payload["z"])
    assert len(blobs(path)) == 2  # the repeated layer is stored once
    assert 2 * BIG <= written < 2 * BIG + 4096
    assert path.stat().st_size < 4096


def test_a_second_save_writes_only_the_changed_value_and_drops_the_old_one(tmp_path: Path):
    path = tmp_path / "checkpoint.pkl"
    layers = [os.urandom(BIG) for _ in range(5)]
    checkpoints.save(path, {"layers": layers})
    before = blobs(path)
    layers[2] = os.urandom(BIG)
    written = checkpoints.save(path, {"layers": layers})
    assert BIG <= written < BIG + 4096
    after = blobs(path)
    assert len(after) == 5 and len(after - before) == 1 and len(before - after) == 1
    assert checkpoints.load(path)["layers"] == layers


def test_a_crash_before_the_file_is_replaced_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    path = tmp_path / "checkpoint.pkl"
    first = {"layers": [os.urandom(BIG), os.urandom(BIG)]}
    checkpoints.save(path, first)

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(checkpoints.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        checkpoints.save(path, {"layers": [os.urandom(BIG), first["layers"][1]]})
    monkeypatch.undo()
    assert checkpoints.load(path) == first  # its blobs were not collected
    second = {"layers": [os.urandom(BIG)]}
    checkpoints.save(path, second)
    assert checkpoints.load(path) == second and len(blobs(path)) == 1  # orphans collected by the next save


def test_a_missing_blob_is_named(tmp_path: Path):
    path = tmp_path / "checkpoint.pkl"
    checkpoints.save(path, {"layer": os.urandom(BIG)})
    (missing,) = blobs(path)
    (path.with_name(path.name + checkpoints.BLOB_DIR_SUFFIX) / missing).unlink()
    with pytest.raises(pickle.UnpicklingError, match=missing):
        checkpoints.load(path)


def test_plain_pickled_checkpoints_of_earlier_versions_still_load(tmp_path: Path):
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps({"version": 1, "layers": [os.urandom(BIG)]}))
    assert checkpoints.load(path)["version"] == 1


def test_bbtv2_rewrites_one_layers_strategy_per_generation(tmp_path: Path):
    """At d = 500 a CMA-ES state is ~4 MB; BBTv2 tells one layer per generation, so a save writes ~one of them."""
    tuner = make_tuner("bbtv2", fake_model(3), popsize=4, prompt_length=2, intrinsic_dim=500, seed=1)
    path = tmp_path / "checkpoint.pkl"
    full = checkpoints.save(path, tuner.state_dict())
    tuner.tell([float(i) for i in range(len(tuner.ask()))])
    step = checkpoints.save(path, tuner.state_dict())
    assert full > 2.5 * step > 0  # three strategies at first, then the one that was told
    restored = make_tuner("bbtv2", fake_model(3), popsize=4, prompt_length=2, intrinsic_dim=500, seed=1)
    restored.load_state_dict(checkpoints.load(path))
    for a, b in zip(tuner.ask(), restored.ask(), strict=True):
        np.testing.assert_array_equal(a.z, b.z)


def test_old_checkpoints_naming_moved_classes_still_load(tmp_path: Path, monkeypatch):
    """A checkpoint written when PromptCandidate lived in tuners/base.py names that module; it still loads."""
    import lmaas_client.prompts as prompts
    import lmaas_client.tuners.base as old_home

    for name in ("PromptCandidate", "ProjectedZ", "LowRank"):  # pickle as the old module layout did
        monkeypatch.setattr(old_home, name, getattr(prompts, name), raising=False)
        monkeypatch.setattr(getattr(prompts, name), "__module__", "lmaas_client.tuners.base")
    candidate = prompts.PromptCandidate(
        token_ids=[1, 2], offset=prompts.LowRank(np.zeros((2, 1)), np.ones((1, 3))), z=np.arange(3.0)
    )
    path = tmp_path / "checkpoint.pkl"
    checkpoints.save(path, {"best": candidate})
    assert b"lmaas_client.tuners.base" in path.read_bytes()
    monkeypatch.undo()
    for name in ("PromptCandidate", "ProjectedZ", "LowRank"):  # only the redirect table can find them now
        monkeypatch.delattr(old_home, name, raising=False)

    loaded = checkpoints.load(path)
    assert type(loaded["best"]) is prompts.PromptCandidate and type(loaded["best"].offset) is prompts.LowRank
    assert loaded["best"].token_ids == [1, 2]
    np.testing.assert_array_equal(loaded["best"].z, np.arange(3.0))


# ----------------------------------------------------------------------------- untrusted checkpoints


class Payload:
    """What an attacker adds to a shared run folder: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_naming_code_is_refused_before_it_runs(tmp_path: Path):
    path, marker = tmp_path / "checkpoint.pkl", tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"version": 1, "tuner": Payload(marker)}))
    with pytest.raises(checkpoints.CheckpointError, match=r"system.*refusing"):
        checkpoints.load(path)
    assert not marker.exists()


def test_a_pickled_strategy_inside_a_checkpoint_is_held_to_the_same_rules(tmp_path: Path):
    """BBTv2 and the CMA tuners keep pycma's own pickle as bytes in their state: it is loaded the same way."""
    from lmaas_client.tuners import cmaes

    marker = tmp_path / "pwned"
    with pytest.raises(checkpoints.CheckpointError, match="CMA-ES state"):
        cmaes.loads(pickle.dumps(Payload(marker)))
    assert not marker.exists()
    es = cmaes.strategy(4, 0.5, 3, seed=1)
    np.testing.assert_array_equal(cmaes.loads(cmaes.dumps(es)).mean, es.mean)  # a real strategy still loads


def test_blob_names_are_digests_never_paths(tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * BIG)
    path = tmp_path / "run" / "checkpoint.pkl"
    path.parent.mkdir()

    class Ref(pickle.Pickler):
        def persistent_id(self, obj):
            return ("lmaas-blob", "../../secret") if obj == "ref" else None

    with path.open("wb") as handle:
        Ref(handle).dump({"layer": "ref"})
    with pytest.raises(checkpoints.CheckpointError, match="invalid blob reference"):
        checkpoints.load(path)


def test_a_tampered_blob_is_refused(tmp_path: Path):
    path = tmp_path / "checkpoint.pkl"
    checkpoints.save(path, {"layer": os.urandom(BIG)})
    (name,) = blobs(path)
    (path.with_name(path.name + checkpoints.BLOB_DIR_SUFFIX) / name).write_bytes(os.urandom(BIG))
    with pytest.raises(checkpoints.CheckpointError, match="does not match its digest"):
        checkpoints.load(path)
