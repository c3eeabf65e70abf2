"""Sharded on 8 simulated CPU devices (data=2 x model=4) == one device, and really spread out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from multiprocess_worker import (
    BATCH,
    CAPACITY,
    MESH_SPEC,
    make_case,
    run_reference,
    run_sharded,
)

from kvcomm_jax.compile_counter import no_new_compiles
from kvcomm_jax.kvcomm.anchor_pool import empty_pool, insert_anchor, record_deltas
from kvcomm_jax.kvcomm.slot_book import SlotBook
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.kv_cache import KVCache, init_cache
from kvcomm_jax.model.transformer import forward
from kvcomm_jax.scale import sharding

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets --xla_force_host_platform_device_count=8"
    return sharding.make_mesh(MESH_SPEC)


@pytest.fixture(scope="module")
def case():
    return make_case()


def _assert_trees_close(got, want):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL, err_msg=jax.tree_util.keystr(path))


def _assert_layout(x, mesh, spec):
    """``x`` is laid out as ``PartitionSpec(*spec)`` on ``mesh`` (trailing ``None``s or not)."""
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(*spec)), x.ndim), (x.sharding, spec)


def _assert_spread(x, ways):
    """``x`` is split ``ways`` ways: each device holds 1/ways of it."""
    assert x.addressable_shards[0].data.nbytes * ways == x.nbytes, (x.sharding, x.shape)


# ------------------------------------------------------------------------------ mesh specs


def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec("data=2,model=4") == {"data": 2, "model": 4}
    assert sharding.parse_mesh_spec(" model = 8 ") == {"data": 1, "model": 8}
    assert sharding.parse_mesh_spec("data=3", num_devices=3) == {"data": 3, "model": 1}


@pytest.mark.parametrize("spec, message", [
    ("data=2,expert=4", "unknown axis 'expert'"),
    ("data=0,model=8", "must be positive"),
    ("data=-2,model=-4", "must be positive"),
    ("data=2,model=2", "= 4 devices, but there are 8"),
    ("data=two,model=4", "not an integer"),
    ("data=2,data=4", "given twice"),
    ("data:2,model=4", "not of the form axis=size"),
])
def test_bad_mesh_specs_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_spec(spec)
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(spec)


def test_mesh_axes(mesh):
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 2, "model": 4}


# ------------------------------------------------------------------------------ rules


def test_params_shardings_follow_the_rules(mesh, case):
    specs = jax.tree.map(lambda s: tuple(s.spec), sharding.params_shardings(case["config"], mesh))
    layers = specs["layers"]
    assert layers["attn"]["q_proj"]["kernel"] == (None, None, "model")
    assert layers["attn"]["k_proj"]["kernel"] == (None, None, "model")
    assert layers["attn"]["o_proj"]["kernel"] == (None, "model", None)
    assert layers["mlp"]["gate_proj"]["kernel"] == (None, None, "model")
    assert layers["mlp"]["down_proj"]["kernel"] == (None, "model", None)
    assert specs["embed"]["embedding"] == ("model", None)
    assert specs["lm_head"]["kernel"] == (None, "model")
    assert all(a is None for a in layers["attn_norm"]["scale"] + specs["final_norm"]["scale"])


def test_indivisible_dimensions_fall_back_to_replication(mesh):
    # 6 query heads (48 fused outputs, divisible by 4) and 3 KV heads: heads do not split 4 ways
    config = tiny_config(num_heads=6, num_kv_heads=3, head_dim=8, vocab_size=97, intermediate_size=48)
    specs = jax.tree.map(lambda s: tuple(s.spec), sharding.params_shardings(config, mesh))
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == (None, None, None)
    assert specs["layers"]["attn"]["k_proj"]["kernel"] == (None, None, None)
    assert specs["embed"]["embedding"] == (None, None)  # vocab 97
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == (None, None, "model")  # 48 / 4
    kv = jax.ShapeDtypeStruct((3, 1, 3, 16, 8), jnp.float32)  # batch 1, 3 KV heads
    abstract = KVCache(kv, kv, jax.ShapeDtypeStruct((1, 16), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    cache = sharding.shardings_for(abstract, mesh)
    assert tuple(cache.keys.spec) == (None, None, None, None, None)


# ------------------------------------------------------------------------------ forward, offsets


@pytest.mark.parametrize("apply_offsets", [True, False])
def test_sharded_prefill_and_offsets_equal_one_device(mesh, case, apply_offsets):
    got = run_sharded(case, mesh, apply_offsets=apply_offsets)
    want = run_reference(case, apply_offsets=apply_offsets)
    _assert_trees_close(got, want)
    _assert_layout(got["logits"], mesh, ("data", None, "model"))
    _assert_layout(got["cache_keys"], mesh, (None, "data", "model", None, None))
    _assert_spread(got["cache_keys"], 8)
    assert tuple(got["content1_keys"].sharding.spec)[:2] == (None, "model")
    _assert_spread(got["content1_keys"], 4)
    with no_new_compiles():  # the same shapes and layouts reuse the compiled programs
        run_sharded(case, mesh, apply_offsets=apply_offsets)


def test_sharded_decode_equals_one_device_without_recompiling(mesh, case):
    config = case["config"]
    params = sharding.place(case["params"], mesh, sharding.params_shardings(config, mesh))
    tokens, positions = case["tokens"], case["positions"]
    ref_cache = init_cache(config, BATCH, CAPACITY)
    cache = sharding.place(ref_cache, mesh)
    ref_logits, ref_cache = forward(case["params"], tokens[:, :8], positions[:, :8], ref_cache, config)
    logits, cache = forward(params, tokens[:, :8], positions[:, :8], cache, config)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), **TOL)
    step_inputs = [(jnp.asarray(tokens[:, t : t + 1]), jnp.asarray(positions[:, t : t + 1])) for t in range(8, 12)]
    for i, (tok, pos) in enumerate(step_inputs):
        ref_step, ref_cache = forward(case["params"], tok, pos, ref_cache, config)
        if i == 1:  # after the first decode step compiled, later steps reuse it
            with no_new_compiles():
                step, cache = forward(params, tok, pos, cache, config)
        else:
            step, cache = forward(params, tok, pos, cache, config)
        np.testing.assert_allclose(np.asarray(step), np.asarray(ref_step), **TOL)
    _assert_trees_close(cache, ref_cache)
    assert cache.keys.sharding.is_equivalent_to(sharding.shardings_for(cache, mesh).keys, cache.keys.ndim)


# ------------------------------------------------------------------------------ pools


def _pool_ops(config, rng):
    """A sequence of pool updates: three anchors, deltas for consumers 1 and 2; returns the per-step arguments."""
    L, H, D = config.num_layers, config.num_kv_heads, config.head_dim

    def kv(tokens, scale=1.0):
        return (scale * rng.standard_normal((L, H, tokens, D))).astype(np.float32)

    return [
        (kv(16), kv(16), length, [(consumer, kv(16, 0.1), kv(16, 0.1), kv(8, 0.1), kv(8, 0.1)) for consumer in consumers])
        for length, consumers in ((12, (1, 2)), (16, (2,)), (9, (1,)))
    ]


def test_pool_updates_on_sharded_pool_equal_unsharded(mesh, case):
    config = case["config"]
    ops = _pool_ops(config, np.random.RandomState(3))

    def build(insert, record, pool):
        book = SlotBook.empty(pool.slots)
        for keys, values, length, deltas in ops:
            pool, slot = insert(pool, book, keys, values, length)
            for consumer, *arrays in deltas:
                pool = record(pool, book, slot, consumer, *arrays)
        return pool

    def fresh():  # one slot allocated: the slot axis grows 1 -> 2 -> 4 (replicated over data, then split)
        return empty_pool(4, config.num_layers, config.num_kv_heads, config.head_dim, 16, jnp.float32, slots=1)

    want = build(
        lambda p, b, k, v, n: insert_anchor(p, b, k, v, n, window=2),
        record_deltas,
        fresh(),
    )
    def insert_placed(p, b, k, v, n):  # as the engine's anchor store does: update, then lay out again
        p, slot = insert_anchor(p, b, k, v, n, window=2)
        return sharding.place(p, mesh), slot

    got = build(
        insert_placed,
        lambda p, b, s, c, *a: sharding.place(record_deltas(p, b, s, c, *a), mesh),
        sharding.place(fresh(), mesh),
    )
    assert sorted(got.consumers) == ["1", "2"] and got.slots == 4
    _assert_trees_close(got, want)
    # every anchor stack (base and deltas) is split: anchors over data, KV heads over model
    for stack in (got.keys, got.values, *[x for c in got.consumers.values() for x in
                                          (c.placeholder_keys, c.placeholder_values, c.prefix_keys, c.prefix_values)]):
        _assert_layout(stack, mesh, ("data", None, "model", None, None))
        _assert_spread(stack, 8)
    assert got.valid.sharding.is_fully_replicated
    assert jax.tree.structure(got) == jax.tree.structure(sharding.shardings_for(got, mesh))


def test_pool_token_axis_grows_sharded(mesh, case):
    config = case["config"]
    pool = empty_pool(4, config.num_layers, config.num_kv_heads, config.head_dim, 16, jnp.float32)
    pool = sharding.place(pool, mesh)
    keys = np.ones((config.num_layers, config.num_kv_heads, 32, config.head_dim), np.float32)
    pool, slot = insert_anchor(pool, SlotBook.empty(pool.slots), keys, keys, 20, window=2)
    pool = sharding.place(pool, mesh)
    assert pool.token_capacity == 32 and slot == 0
    _assert_spread(pool.keys, 8)


def test_bytes_per_device(mesh):
    pool = jax.eval_shape(lambda: empty_pool(20, 32, 8, 128, 1024, jnp.bfloat16))
    stack = 20 * 32 * 8 * 1024 * 128 * 2  # one bf16 [V, L, H, T, D] array
    bookkeeping = 3 * 20 * 4 + 20 + 4  # lengths, activations, ages int32; valid bool; next_age
    assert sharding.bytes_per_device(pool, sharding.shardings_for(pool, mesh)) == 2 * stack // 8 + bookkeeping
