"""Segment extraction (kvcomm/segments.py), docs/design.md §1 and §4.

A KV cache is filled by hand with random keys at known, arbitrary positions; the
extracted segments are checked against an independent numpy float64 rotate-half
rotation, per layer with that layer's frequency table.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.kvcomm.segments import (
    SegmentKV,
    extract_segment,
    fit_tokens,
    segment_difference,
)
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.kv_cache import init_cache, write_span
from kvcomm_jax.model.rope import rope_tables

CONFIG = tiny_config(head_dim=16)  # L=3, H_kv=2, D=16
L, H, D = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim
CAPACITY = 64
ATOL = 2e-4  # float32 angles of positions < 300 vs float64: |angle| * 6e-8, plus cos/sin rounding


def _np_rotate(x, amounts, table):
    """numpy float64 rotate-half: token t of layer l of ``x [L, H, T, D]`` rotated by ``amounts[t]``
    with frequencies ``table[l]``."""
    x = np.asarray(x, np.float64)
    table = np.asarray(table, np.float32).astype(np.float64)  # the code's float32 frequencies
    half = x.shape[-1] // 2
    angle = np.asarray(amounts, np.float64)[None, None, :, None] * table[:, None, None, :]  # [L, 1, T, D/2]
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _tables():
    shared = np.asarray(rope_tables(CONFIG), np.float32)  # [L, D/2], identical rows
    # Differing rows: each layer its own RoPE base.
    distinct = np.stack(
        [1.0 / (base ** (np.arange(0, D, 2, dtype=np.float64) / D)) for base in (10000.0, 500.0, 37.0)]
    ).astype(np.float32)
    assert distinct.shape == (L, D // 2)
    return {"shared": shared, "per_layer": distinct}


TABLES = _tables()


def _filled_cache(seed=0, dtype=jnp.float32):
    """A 2-row cache whose every slot holds random keys/values at a random, recorded position.

    Returns the cache and numpy copies ``keys, values [L, 2, H, S, D]``, ``positions [2, S]``.
    """
    rng = np.random.default_rng(seed)
    cache = init_cache(CONFIG, 2, CAPACITY, dtype=dtype)
    keys = rng.standard_normal((L, 2, H, CAPACITY, D)).astype(np.float32)
    values = rng.standard_normal((L, 2, H, CAPACITY, D)).astype(np.float32)
    positions = rng.integers(0, 300, size=(2, CAPACITY)).astype(np.int32)
    for row in range(2):
        # Two writes per row, to exercise write_span at a non-zero start.
        for lo, hi in ((0, 20), (20, CAPACITY)):
            cache = write_span(
                cache, row, lo, jnp.asarray(keys[:, row, :, lo:hi]), jnp.asarray(values[:, row, :, lo:hi]),
                jnp.asarray(positions[row, lo:hi]),
            )
    np.testing.assert_array_equal(np.asarray(cache.positions), positions)
    keys = np.asarray(cache.keys.astype(jnp.float32))  # after any cast to the cache dtype
    values = np.asarray(cache.values.astype(jnp.float32))
    return cache, keys, values, positions


@pytest.fixture(scope="module")
def filled():
    return _filled_cache()


@pytest.mark.parametrize("table_name", ["shared", "per_layer"])
@pytest.mark.parametrize("start, length, bucket", [(0, 5, 16), (7, 11, 16), (13, 16, 16), (30, 20, 32), (9, 0, 16)])
def test_frame0_derotates_each_layer_with_its_table(filled, table_name, start, length, bucket):
    cache, keys, values, positions = filled
    table = TABLES[table_name]
    seg = extract_segment(cache, start, length, jnp.asarray(table), bucket=bucket, frame0=True, impl="reference")
    assert isinstance(seg, SegmentKV)
    assert seg.keys.shape == seg.values.shape == (L, H, bucket, D)
    assert seg.bucket == bucket
    assert seg.length.dtype == jnp.int32 and seg.length.shape == () and int(seg.length) == length

    got_k, got_v = np.asarray(seg.keys), np.asarray(seg.values)
    raw_k = keys[:, 0, :, start : start + length]
    want_k = _np_rotate(raw_k, -positions[0, start : start + length], table)
    np.testing.assert_allclose(got_k[:, :, :length], want_k, atol=ATOL, rtol=0)
    # Values are never rotated: bit-identical to the cache.
    np.testing.assert_array_equal(got_v[:, :, :length], values[:, 0, :, start : start + length])
    # Padding is exactly zero.
    assert not np.any(got_k[:, :, length:]) and not np.any(got_v[:, :, length:])
    # Rotating back by the recorded positions gives the cached keys (frame-0 invariant).
    back = _np_rotate(got_k[:, :, :length], positions[0, start : start + length], table)
    np.testing.assert_allclose(back, raw_k, atol=ATOL, rtol=0)


def test_per_layer_table_is_used_per_layer(filled):
    """The test above can tell layers apart: using row 0 for every layer would be far off."""
    cache, keys, _, positions = filled
    table = TABLES["per_layer"]
    start, length = 3, 12
    seg = extract_segment(cache, start, length, jnp.asarray(table), bucket=16, frame0=True, impl="reference")
    got = np.asarray(seg.keys)[:, :, :length]
    raw = keys[:, 0, :, start : start + length]
    wrong = _np_rotate(raw, -positions[0, start : start + length], np.tile(table[:1], (L, 1)))
    right = _np_rotate(raw, -positions[0, start : start + length], table)
    np.testing.assert_allclose(got, right, atol=ATOL, rtol=0)
    for layer in (1, 2):
        assert np.max(np.abs(got[layer] - wrong[layer])) > 0.1


@pytest.mark.parametrize("start, length, bucket", [(0, 9, 16), (21, 32, 32), (40, 3, 16)])
def test_frame0_false_keeps_keys(filled, start, length, bucket):
    cache, keys, values, _ = filled
    seg = extract_segment(cache, start, length, jnp.asarray(TABLES["shared"]), bucket=bucket, frame0=False)
    got_k, got_v = np.asarray(seg.keys), np.asarray(seg.values)
    np.testing.assert_array_equal(got_k[:, :, :length], keys[:, 0, :, start : start + length])
    np.testing.assert_array_equal(got_v[:, :, :length], values[:, 0, :, start : start + length])
    assert not np.any(got_k[:, :, length:]) and not np.any(got_v[:, :, length:])
    assert int(seg.length) == length and seg.bucket == bucket


def test_reads_row_zero_only(filled):
    cache, keys, values, _ = filled
    seg = extract_segment(cache, 4, 10, jnp.asarray(TABLES["shared"]), bucket=16, frame0=False)
    np.testing.assert_array_equal(np.asarray(seg.keys)[:, :, :10], keys[:, 0, :, 4:14])
    assert np.max(np.abs(np.asarray(seg.values)[:, :, :10] - values[:, 1, :, 4:14])) > 0.1


def test_traced_start_and_length(filled):
    """``start`` and ``length`` may be arrays (one compiled program for every span of a bucket)."""
    cache, keys, values, positions = filled
    table = TABLES["per_layer"]
    for start, length in ((2, 7), (35, 14)):
        seg = extract_segment(
            cache, jnp.int32(start), jnp.int32(length), jnp.asarray(table), bucket=16, frame0=True, impl="reference"
        )
        want = _np_rotate(keys[:, 0, :, start : start + length], -positions[0, start : start + length], table)
        np.testing.assert_allclose(np.asarray(seg.keys)[:, :, :length], want, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(np.asarray(seg.values)[:, :, :length], values[:, 0, :, start : start + length])
        assert not np.any(np.asarray(seg.keys)[:, :, length:])
        assert int(seg.length) == length


def test_interpret_kernel_matches_numpy(filled):
    cache, keys, values, positions = filled
    table = TABLES["per_layer"]
    start, length = 5, 13
    seg = extract_segment(cache, start, length, jnp.asarray(table), bucket=16, frame0=True, impl="interpret")
    want = _np_rotate(keys[:, 0, :, start : start + length], -positions[0, start : start + length], table)
    np.testing.assert_allclose(np.asarray(seg.keys)[:, :, :length], want, atol=ATOL, rtol=0)
    assert not np.any(np.asarray(seg.keys)[:, :, length:]) and not np.any(np.asarray(seg.values)[:, :, length:])


def test_bfloat16_cache():
    cache, keys, values, positions = _filled_cache(seed=3, dtype=jnp.bfloat16)
    table = TABLES["shared"]
    start, length = 6, 10
    seg = extract_segment(cache, start, length, jnp.asarray(table), bucket=16, frame0=True, impl="reference")
    assert seg.keys.dtype == jnp.bfloat16 and seg.values.dtype == jnp.bfloat16
    want = _np_rotate(keys[:, 0, :, start : start + length], -positions[0, start : start + length], table)
    got = np.asarray(seg.keys.astype(jnp.float32))
    np.testing.assert_allclose(got[:, :, :length], want, atol=0.05, rtol=0.02)  # one bf16 rounding
    np.testing.assert_array_equal(
        np.asarray(seg.values.astype(jnp.float32))[:, :, :length], values[:, 0, :, start : start + length]
    )
    assert not np.any(got[:, :, length:])


# --------------------------------------------------------------------------------------
# segment_difference


def _segment(rng, T, length, garbage=True, dtype=np.float32):
    """Random SegmentKV; with ``garbage`` the padding holds non-zero values too."""
    k = rng.standard_normal((L, H, T, D)).astype(np.float32)
    v = rng.standard_normal((L, H, T, D)).astype(np.float32)
    if not garbage:
        k[:, :, length:] = 0
        v[:, :, length:] = 0
    return SegmentKV(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.int32(length))


@pytest.mark.parametrize("length", [0, 5, 16])
def test_segment_difference(length):
    rng = np.random.default_rng(length)
    real, base = _segment(rng, 16, length), _segment(rng, 16, 9)
    diff = segment_difference(real, base)
    for got, a, b in ((diff.keys, real.keys, base.keys), (diff.values, real.values, base.values)):
        got = np.asarray(got)
        want = np.asarray(a, np.float64) - np.asarray(b, np.float64)
        np.testing.assert_allclose(got[:, :, :length], want[:, :, :length], rtol=1e-6, atol=1e-6)
        assert not np.any(got[:, :, length:])
    assert int(diff.length) == length  # the real segment's length, not the base's
    assert diff.keys.dtype == jnp.float32 and diff.keys.shape == (L, H, 16, D)


def test_segment_difference_bfloat16():
    rng = np.random.default_rng(11)
    real = _segment(rng, 16, 7, dtype=jnp.bfloat16)
    base = _segment(rng, 16, 7, dtype=jnp.bfloat16)
    diff = segment_difference(real, base)
    assert diff.keys.dtype == jnp.bfloat16 and diff.values.dtype == jnp.bfloat16
    want = np.asarray(real.keys.astype(jnp.float32), np.float64) - np.asarray(base.keys.astype(jnp.float32), np.float64)
    got = np.asarray(diff.keys.astype(jnp.float32))
    np.testing.assert_allclose(got[:, :, :7], want[:, :, :7], rtol=1e-2, atol=1e-2)
    assert not np.any(got[:, :, 7:])


# --------------------------------------------------------------------------------------
# fit_tokens


def test_fit_tokens_pads_with_zeros():
    x = np.random.default_rng(0).standard_normal((L, H, 5, D)).astype(np.float32)
    y = np.asarray(fit_tokens(jnp.asarray(x), 16))
    assert y.shape == (L, H, 16, D)
    np.testing.assert_array_equal(y[:, :, :5], x)
    assert not np.any(y[:, :, 5:])


def test_fit_tokens_cuts():
    x = np.random.default_rng(1).standard_normal((L, H, 32, D)).astype(np.float32)
    y = np.asarray(fit_tokens(jnp.asarray(x), 16))
    assert y.shape == (L, H, 16, D)
    np.testing.assert_array_equal(y, x[:, :, :16])


def test_fit_tokens_same_size_and_stacks():
    x = np.random.default_rng(2).standard_normal((4, L, H, 16, D)).astype(np.float32)  # an anchor stack
    np.testing.assert_array_equal(np.asarray(fit_tokens(jnp.asarray(x), 16)), x)
    up = np.asarray(fit_tokens(jnp.asarray(x), 32))
    assert up.shape == (4, L, H, 32, D)
    np.testing.assert_array_equal(up[..., :16, :], x)
    assert not np.any(up[..., 16:, :])
    down = np.asarray(fit_tokens(jnp.asarray(x), 3))
    assert down.shape == (4, L, H, 3, D)
    np.testing.assert_array_equal(down, x[..., :3, :])
    # The token axis is -2 whatever the head dim: a [.., T, D] with D != T pads T only.
    z = np.ones((2, 3, 5), np.float32)
    assert np.asarray(fit_tokens(jnp.asarray(z), 4)).shape == (2, 4, 5)
