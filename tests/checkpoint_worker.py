"""Anchor-pool checkpoints written and read by a multi-process job (run once per process).

``tests/test_multiprocess_checkpoints.py`` starts this file in every process of a job,
with ``KVCOMM_COORDINATOR`` / ``KVCOMM_NUM_PROCESSES`` / ``KVCOMM_PROCESS_ID`` set:

* ``save DIR SEED``: the pools of ``pools(SEED)``, laid out over a ``data=2,model=4`` mesh
  that spans the processes, saved to DIR;
* ``load DIR OUT``: the pools in DIR restored onto that mesh; process 0 writes their values
  (gathered) and the predictions they make to ``OUT/restored.npz`` and ``OUT/predictions.json``;
* ``save-killed DIR SEED``: as ``save``, but process 1 kills itself (SIGKILL) once its
  checkpoint writer has started, so the save is interrupted on one process.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from test_persistence import FINGERPRINT, prediction, sample_pool

from kvcomm_jax.kvcomm.persistence import load_pools, save_pools
from kvcomm_jax.scale import sharding
from kvcomm_jax.scale.distributed import failing_together, maybe_initialize_distributed

MESH_SPEC = "data=2,model=4"


def pools(seed: int) -> dict:
    """Host-built pools (the same on every process)."""
    return {"q": sample_pool(seed, anchors=3), "r": sample_pool(seed + 1, anchors=2, tokens=32)}


def probe_values(pool, seed: int = 7) -> dict:
    """Contents to predict against ``pool``: one near its first anchor, one unrelated ``[L, H, T, D]``."""
    rng = np.random.RandomState(seed)
    first = np.asarray(pool.values[0])
    return {"near": first + 0.01 * rng.standard_normal(first.shape).astype(np.float32),
            "unrelated": rng.standard_normal(first.shape).astype(np.float32)}


def predictions(restored: dict) -> dict:
    """``prediction`` of every probe content at two lengths, per pool: plain values."""
    out = {}
    for name, pool in restored.items():
        for probe, values in probe_values(jax.tree.map(np.asarray, pools(0)[name])).items():
            for length in (9, 14):
                out[f"{name}/{probe}/{length}"] = prediction(pool, values, length)
    return out


def _kill_self_when_writing() -> None:
    """Process 1's checkpointer dies (SIGKILL) as it starts writing its part of the arrays."""
    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.Checkpointer.save = save


def main(command: str, directory: str, arg: str) -> None:
    maybe_initialize_distributed()
    mesh = sharding.make_mesh(MESH_SPEC)
    if command in ("save", "save-killed"):
        if command == "save-killed" and jax.process_index() == 1:
            _kill_self_when_writing()
        save_pools(directory, sharding.place(pools(int(arg)), mesh), FINGERPRINT)
        return
    restored = load_pools(directory, FINGERPRINT, shardings=mesh)
    gathered = multihost_utils.process_allgather(restored, tiled=True)
    found = predictions(restored)
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_leaves_with_path(gathered)
        np.savez(os.path.join(arg, "restored.npz"), **{jax.tree_util.keystr(p): x for p, x in leaves})
        with open(os.path.join(arg, "predictions.json"), "w") as f:
            json.dump(found, f)


if __name__ == "__main__":
    with failing_together():
        main(*sys.argv[1:4])
