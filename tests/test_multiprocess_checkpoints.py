"""Anchor-pool checkpoints across process counts: 2 processes save, 1 restores, and the reverse;
a save interrupted on one process leaves the previous checkpoint loadable."""

import json
import os

import jax
import numpy as np
from checkpoint_worker import MESH_SPEC, pools, predictions
from processes import python, run_job
from test_persistence import FINGERPRINT, assert_identical

from kvcomm_jax.kvcomm.persistence import load_pools, save_pools
from kvcomm_jax.scale import sharding

HEARTBEAT_S = 10


def assert_same_predictions(got: dict, want: dict) -> None:
    """Same decisions and activation increments; entropies equal up to float32 summation order (layouts differ)."""
    assert got.keys() == want.keys()
    for key, (anchor, increments, entropy) in want.items():
        assert list(got[key][:2]) == [anchor, list(increments)], key
        np.testing.assert_allclose(got[key][2], entropy, rtol=1e-5, err_msg=key)


def test_two_processes_save_one_restores(tmp_path):
    run_job(python("checkpoint_worker.py", "save", tmp_path / "ckpt", 0), tmp_path).check()
    want = pools(0)
    for shardings in (None, sharding.make_mesh(MESH_SPEC), sharding.make_mesh("data=1,model=2", jax.devices()[:2])):
        restored = load_pools(tmp_path / "ckpt", FINGERPRINT, shardings=shardings)
        assert_identical(restored, want)  # bit-exact on one device and on other mesh shapes
        assert_same_predictions(predictions(restored), predictions(want))


def test_one_process_saves_two_restore(tmp_path):
    save_pools(tmp_path / "ckpt", sharding.place(pools(3), sharding.make_mesh("data=2,model=2", jax.devices()[:4])), FINGERPRINT)
    out = tmp_path / "out"
    out.mkdir()
    run_job(python("checkpoint_worker.py", "load", tmp_path / "ckpt", out), tmp_path).check()
    assert sorted(os.listdir(out)) == ["predictions.json", "restored.npz"]  # process 0 wrote them
    restored = np.load(out / "restored.npz")
    want = pools(3)
    leaves = jax.tree_util.tree_leaves_with_path(want)
    assert sorted(restored.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
    for path, x in leaves:
        got = restored[jax.tree_util.keystr(path)]
        assert got.dtype == np.asarray(x).dtype and got.tobytes() == np.asarray(x).tobytes(), jax.tree_util.keystr(path)
    with open(out / "predictions.json") as f:
        assert_same_predictions(json.load(f), predictions(want))


def test_save_killed_on_one_process_keeps_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    run_job(python("checkpoint_worker.py", "save", directory, 0), tmp_path).check()
    current = (directory / "CURRENT").read_text()
    job = run_job(python("checkpoint_worker.py", "save-killed", directory, 5), tmp_path, timeout_s=120,
                  KVCOMM_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S))
    assert job.returncodes[1] == -9  # killed itself while saving
    assert job.returncodes[0] == 1, job.logs[0][-3000:]  # the survivor did not finish the save ...
    assert "error: process 0 of 2 failed" in job.logs[0]  # ... and said why, then stopped at once
    assert (directory / "CURRENT").read_text() == current
    assert_identical(load_pools(directory, FINGERPRINT), pools(0))
