"""Checkpoints of anchor pools and params: bit-exact round trips, atomic saves, clear errors."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.kvcomm.anchor_pool import empty_pool, insert_anchor, record_deltas
from kvcomm_jax.kvcomm.matching import predict
from kvcomm_jax.kvcomm.persistence import (
    CorruptCheckpointError,
    load_params,
    load_pools,
    model_fingerprint,
    save_params,
    save_pools,
)
from kvcomm_jax.kvcomm.slot_book import SlotBook
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.transformer import init_params
from kvcomm_jax.scale import sharding

CONFIG = tiny_config(num_heads=8, num_kv_heads=4, head_dim=8, hidden_size=64)
FINGERPRINT = model_fingerprint(CONFIG)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_pool(seed: int, dtype=jnp.float32, anchors: int = 3, capacity: int = 4, tokens: int = 16):
    """A pool with ``anchors`` anchors; consumers 1 (all anchors) and 2 (the first), different prefix lengths."""
    rng = np.random.RandomState(seed)
    L, H, D = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim

    def kv(t, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal((L, H, t, D)), dtype)

    pool, book = empty_pool(capacity, L, H, D, tokens, dtype), SlotBook.empty(capacity)
    for i in range(anchors):
        pool, slot = insert_anchor(pool, book, kv(tokens), kv(tokens), tokens - i, window=2)
        pool = record_deltas(pool, book, slot, 1, kv(tokens, 0.1), kv(tokens, 0.1), kv(8, 0.1), kv(8, 0.1))
        if i == 0:
            pool = record_deltas(pool, book, slot, 2, kv(tokens, 0.1), kv(tokens, 0.1), kv(4, 0.1), kv(4, 0.1))
    return pool


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)  # bit-exact, NaNs included


@pytest.fixture(scope="module")
def pools():
    return {"user_question": sample_pool(0), "agent_0_current": sample_pool(1, jnp.bfloat16, anchors=2, tokens=32)}


# ------------------------------------------------------------------------------ round trips


def test_pools_round_trip_bit_exact(tmp_path, pools):
    with pytest.raises(ValueError, match="dtype: pool 'bfloat16', model 'float32'"):
        save_pools(tmp_path / "ckpt", pools, FINGERPRINT)  # the bf16 pool does not fit a float32 model
    bf16 = model_fingerprint(CONFIG.replace(dtype="bfloat16"))
    save_pools(tmp_path / "f32", {"user_question": pools["user_question"]}, FINGERPRINT)
    save_pools(tmp_path / "bf16", {"agent_0_current": pools["agent_0_current"]}, bf16)
    assert_identical(load_pools(tmp_path / "f32", FINGERPRINT), {"user_question": pools["user_question"]})
    restored = load_pools(tmp_path / "bf16", bf16)
    assert_identical(restored, {"agent_0_current": pools["agent_0_current"]})
    assert sorted(restored["agent_0_current"].consumers) == ["1", "2"]


def prediction(pool, values, length):
    """``predict`` against ``pool`` as plain values: (becomes_anchor, activation increments, entropy)."""
    becomes_anchor, increments, entropy = predict(values, length, pool.values, pool.lengths, pool.valid, 0.3)
    return bool(becomes_anchor), np.asarray(increments).tolist(), float(entropy)


def test_restored_pool_makes_the_same_predictions(tmp_path, pools):
    pool = pools["user_question"]  # anchors 16, 15 and 14 tokens long
    save_pools(tmp_path, {"q": pool}, FINGERPRINT)
    restored = load_pools(tmp_path, FINGERPRINT)["q"]
    rng = np.random.RandomState(7)
    shape = pool.values.shape[1:]
    contents = {
        "near_anchor_0": jnp.asarray(np.asarray(pool.values[0]) + 0.01 * rng.standard_normal(shape), jnp.float32),
        "unrelated": jnp.asarray(rng.standard_normal(shape), jnp.float32),
    }
    predicted = {}
    for length in (9, 14, 16):
        for name, values in contents.items():
            predicted[name, length] = prediction(pool, values, length)
            assert prediction(restored, values, length) == predicted[name, length], (name, length)
    # every outcome occurs, so the equalities above are informative
    for length in (9, 14):
        assert predicted["near_anchor_0", length][:2] == (False, [1, 0, 0, 0])  # shared; anchor 0 activated
        assert predicted["unrelated", length][:2] == (True, [0, 0, 0, 0])  # too uncertain: a new anchor
        assert predicted["near_anchor_0", length][2] < predicted["unrelated", length][2]
    assert predicted["near_anchor_0", 16][0]  # only anchor 0 is 16 tokens long: a new anchor


def test_pools_restore_into_mesh_shardings(tmp_path, pools):
    mesh = sharding.make_mesh("data=2,model=4")
    save_pools(tmp_path, {"q": pools["user_question"]}, FINGERPRINT)
    restored = load_pools(tmp_path, FINGERPRINT, shardings=mesh)["q"]
    want = sharding.shardings_for(restored, mesh)
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True):
        assert x.sharding == s
    assert restored.keys.addressable_shards[0].data.nbytes * 8 == restored.keys.nbytes
    assert_identical(restored, pools["user_question"])
    # explicit shardings must match the saved structure
    without_consumer = pools["user_question"].replace(consumers={})
    with pytest.raises(ValueError, match="do not match the checkpoint's structure"):
        load_pools(tmp_path, FINGERPRINT, shardings={"q": sharding.shardings_for(without_consumer, mesh)})


def test_params_round_trip_bit_exact_and_sharded(tmp_path):
    params = init_params(CONFIG, seed=3)
    save_params(tmp_path, params, CONFIG)
    assert_identical(load_params(tmp_path, CONFIG), params)
    mesh = sharding.make_mesh("data=2,model=4")
    restored = load_params(tmp_path, CONFIG, shardings=mesh)
    assert_identical(restored, params)
    q = restored["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding == sharding.params_shardings(CONFIG, mesh)["layers"]["attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.nbytes * 4 == q.nbytes


# ------------------------------------------------------------------------------ mismatches


def test_different_model_raises_naming_the_difference(tmp_path, pools):
    save_pools(tmp_path / "pools", {"q": pools["user_question"]}, FINGERPRINT)
    other = CONFIG.replace(num_layers=4, rope_theta=500000.0)
    with pytest.raises(ValueError, match=r"different model: num_layers: checkpoint 3, expected 4; rope_theta"):
        load_pools(tmp_path / "pools", model_fingerprint(other))
    save_params(tmp_path / "params", init_params(CONFIG), CONFIG)
    with pytest.raises(ValueError, match=r"different model: hidden_size: checkpoint 64, expected 32"):
        load_params(tmp_path / "params", CONFIG.replace(hidden_size=32))
    with pytest.raises(ValueError, match="holds params, not anchor_pools"):
        load_pools(tmp_path / "params", FINGERPRINT)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_pools(tmp_path / "missing", FINGERPRINT)


def _live_files(directory):
    version = open(os.path.join(directory, "CURRENT")).read()
    files = [p for p in glob.glob(os.path.join(directory, version, "**", "*"), recursive=True) if os.path.isfile(p)]
    return version, sorted(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["garble_data", "truncate_data", "garble_metadata", "delete_arrays"])
def test_corrupted_checkpoint_raises_clear_error(tmp_path, pools, damage):
    save_pools(tmp_path, {"q": pools["user_question"]}, FINGERPRINT)
    version, files = _live_files(tmp_path)
    largest = files[-1]  # the OCDBT data file holding the arrays
    data = bytearray(open(largest, "rb").read())
    if damage == "garble_data":
        data[len(data) // 2] ^= 0x20
        open(largest, "wb").write(bytes(data))
    elif damage == "truncate_data":
        open(largest, "wb").write(bytes(data[: len(data) // 3]))
    elif damage == "garble_metadata":
        meta = os.path.join(tmp_path, version, "metadata.json")
        text = open(meta).read()
        open(meta, "w").write(text[: len(text) // 2])
    else:
        shutil.rmtree(os.path.join(tmp_path, version, "arrays"))
    with pytest.raises(CorruptCheckpointError, match="checkpoint .*(checksums|cannot be read|unreadable metadata)"):
        load_pools(tmp_path, FINGERPRINT)


# ------------------------------------------------------------------------------ atomicity

_BIG_SAVE = """
import sys
import jax, jax.numpy as jnp
from kvcomm_jax.kvcomm.anchor_pool import empty_pool
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.kvcomm.persistence import model_fingerprint, save_pools
config = tiny_config(num_heads=8, num_kv_heads=4, head_dim=8, hidden_size=64)
pool = empty_pool(64, config.num_layers, config.num_kv_heads, config.head_dim, 2048, jnp.float32)
key = jax.random.PRNGKey(0)
pool = pool.replace(keys=jax.random.normal(key, pool.keys.shape), values=jax.random.normal(key + 1, pool.values.shape))
save_pools(sys.argv[1], {"q": pool}, model_fingerprint(config))
"""


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, pools):
    previous = {"q": pools["user_question"]}
    save_pools(tmp_path, previous, FINGERPRINT)
    current = open(tmp_path / "CURRENT").read()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", _BIG_SAVE, str(tmp_path)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(str(tmp_path / ".tmp-*" / "**" / "*"), recursive=True):  # orbax has started writing
            assert proc.poll() is None, f"the saving process exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert glob.glob(str(tmp_path / ".tmp-*")), "the save finished before the kill; nothing was interrupted"
    assert open(tmp_path / "CURRENT").read() == current
    assert_identical(load_pools(tmp_path, FINGERPRINT), previous)
    # the next save succeeds and clears the leftovers
    save_pools(tmp_path, {"q": pools["user_question"].replace(activations=pools["user_question"].activations + 1)}, FINGERPRINT)
    assert sorted(os.listdir(tmp_path)) == sorted(["CURRENT", open(tmp_path / "CURRENT").read()])
    assert int(load_pools(tmp_path, FINGERPRINT)["q"].activations[0]) == int(pools["user_question"].activations[0]) + 1
