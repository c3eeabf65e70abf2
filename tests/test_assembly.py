"""Cache assembly on the reuse path (kvcomm/reuse.py ``assemble_cache``), docs/design.md §9 step 4b.

Synthetic segments check where each one lands; an end-to-end test on a tiny random model
splits a dense prefill into frame-0 segments, re-rotates and re-assembles them, and gets
the dense cache back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.kvcomm.anchor_pool import ConsumerDeltas
from kvcomm_jax.kvcomm.layout import Layout
from kvcomm_jax.kvcomm.reuse import (
    AnchorInputs,
    PlaceholderInputs,
    assemble_cache,
    assemble_cache_batch,
    build_reuse_cache,
    correct_segments_batch,
    correction_sizes,
)
from kvcomm_jax.kvcomm.segments import SegmentKV, extract_segment
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.rope import rope_tables
from kvcomm_jax.model.transformer import forward, init_params
from pallas_kernels import rotate_keys

L, H, D = 3, 2, 8


def _segment(rng, length, bucket, pad_value=0.0, dtype=jnp.float32):
    """Random SegmentKV of ``length`` valid tokens padded to ``bucket`` with ``pad_value``."""
    k = np.full((L, H, bucket, D), pad_value, np.float32)
    v = np.full((L, H, bucket, D), pad_value, np.float32)
    k[:, :, :length] = rng.standard_normal((L, H, length, D))
    v[:, :, :length] = rng.standard_normal((L, H, length, D))
    return SegmentKV(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.int32(length))


def _starts(lengths):
    """Consecutive starts after prefix 0 (an explicit running sum)."""
    starts, pos = [], lengths[0]
    for n in lengths[1:]:
        starts.append(pos)
        pos += n
    return starts, pos


CASES = {
    # (prefix0 length, bucket), then (length, bucket) of content 0, prefix 1, content 1, prefix 2 ...
    "two_placeholders": [(5, 16), (3, 16), (2, 16), (7, 16), (4, 16)],
    "mixed_buckets": [(17, 32), (20, 32), (1, 16), (9, 16), (6, 16)],
    "empty_segments": [(4, 16), (0, 16), (0, 16), (5, 16), (3, 16)],
    "no_placeholder": [(11, 16)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pad_value", [0.0, 7.5])
def test_segments_land_at_their_starts(case, pad_value):
    spec = CASES[case]
    rng = np.random.default_rng(len(spec))
    segs = [_segment(rng, n, b, pad_value) for n, b in spec]
    starts, total = _starts([n for n, _ in spec])
    last_start = starts[-1] if starts else 0
    capacity = 128
    num_cached = total - 1
    cache = assemble_cache(segs[0], segs[1:], jnp.asarray(starts, jnp.int32), jnp.int32(num_cached), capacity=capacity)

    assert cache.keys.shape == cache.values.shape == (L, 1, H, capacity, D)
    assert cache.keys.dtype == jnp.float32
    assert cache.positions.shape == (1, capacity) and cache.positions.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(cache.lengths), [num_cached])

    keys, values, positions = np.asarray(cache.keys), np.asarray(cache.values), np.asarray(cache.positions)
    for seg, start in zip(segs, [0, *starts]):
        n = int(seg.length)
        # Valid tokens of every segment survive (a later segment overwrites only earlier padding),
        # on every layer.
        np.testing.assert_array_equal(keys[:, 0, :, start : start + n], np.asarray(seg.keys)[:, :, :n])
        np.testing.assert_array_equal(values[:, 0, :, start : start + n], np.asarray(seg.values)[:, :, :n])
        np.testing.assert_array_equal(positions[0, start : start + n], start + np.arange(n))
    # The prompt's slots hold positions 0 .. total-1: one continuous run.
    np.testing.assert_array_equal(positions[0, :total], np.arange(total))
    # Beyond the last segment's bucket nothing was written.
    end = last_start + segs[-1].bucket
    assert not np.any(keys[:, :, :, end:]) and not np.any(values[:, :, :, end:])
    assert not np.any(positions[0, end:])
    if pad_value == 0.0:
        # Zero padding everywhere: all slots from the prompt's end on are zero.
        assert not np.any(keys[:, :, :, total:]) and not np.any(values[:, :, :, total:])


def test_a_batch_assembles_each_row_as_alone():
    """Rows with their own segments and starts: each row of the batch is that row assembled alone."""
    rng = np.random.default_rng(3)
    prefix0 = _segment(rng, 5, 16, 0.0)
    rows = [[_segment(rng, n, b, 0.0) for n, b in spec] for spec in ([(3, 32), (2, 16)], [(20, 32), (2, 16)])]
    starts = [_starts([5, 3, 2])[0], _starts([5, 20, 2])[0]]
    stacked = [
        SegmentKV(jnp.stack([r[i].keys for r in rows]), jnp.stack([r[i].values for r in rows]), jnp.stack([r[i].length for r in rows]))
        for i in range(2)
    ]
    batch = assemble_cache_batch(prefix0, stacked, jnp.asarray(starts, jnp.int32), jnp.asarray([9, 26], jnp.int32), capacity=64)
    for b, (segs, row_starts, n) in enumerate(zip(rows, starts, (9, 26))):
        alone = assemble_cache(prefix0, segs, jnp.asarray(row_starts, jnp.int32), jnp.int32(n), capacity=64)
        for name in ("keys", "values"):
            np.testing.assert_array_equal(np.asarray(getattr(batch, name))[:, b], np.asarray(getattr(alone, name))[:, 0])
        np.testing.assert_array_equal(np.asarray(batch.positions[b]), np.asarray(alone.positions[0]))
        np.testing.assert_array_equal(np.asarray(batch.positions[b, : n + 1]), np.arange(n + 1))  # one continuous run
        assert int(batch.lengths[b]) == n


def test_later_segment_overwrites_earlier_padding():
    """A long-bucket content whose padding covers the next two segments' slots."""
    rng = np.random.default_rng(5)
    prefix0 = _segment(rng, 3, 16, pad_value=-1.0)
    content = _segment(rng, 2, 32, pad_value=99.0)  # padding over slots 5 .. 35
    prefix1 = _segment(rng, 4, 16, pad_value=99.0)
    content1 = _segment(rng, 6, 16, pad_value=0.0)
    starts = [3, 5, 9]
    cache = assemble_cache(prefix0, [content, prefix1, content1], jnp.asarray(starts, jnp.int32), jnp.int32(14),
                           capacity=64)
    keys = np.asarray(cache.keys)
    np.testing.assert_array_equal(keys[:, 0, :, 5:9], np.asarray(prefix1.keys)[:, :, :4])
    np.testing.assert_array_equal(keys[:, 0, :, 9:15], np.asarray(content1.keys)[:, :, :6])
    assert not np.any(keys[:, 0, :, 15:25])  # content1's zero padding replaced the 99s
    # Slots past content1's bucket still hold content's padding (written before, never overwritten).
    assert np.all(keys[:, 0, :, 25:35] == 99.0)
    np.testing.assert_array_equal(np.asarray(cache.positions)[0, :25], np.arange(25))


def test_bfloat16_segments():
    rng = np.random.default_rng(2)
    segs = [_segment(rng, n, 16, dtype=jnp.bfloat16) for n in (4, 3, 5)]
    cache = assemble_cache(segs[0], segs[1:], jnp.asarray([4, 7], jnp.int32), jnp.int32(11), capacity=32)
    assert cache.keys.dtype == cache.values.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(cache.keys[:, 0, :, 7:12].astype(jnp.float32)), np.asarray(segs[2].keys[:, :, :5].astype(jnp.float32))
    )


# --------------------------------------------------------------------------------------
# End to end: dense prefill -> frame-0 segments -> re-rotated, assembled cache == dense cache


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def dense():
    config = tiny_config()
    params = init_params(config, seed=4)
    rng = np.random.default_rng(0)
    prefix_lengths, content_lengths = [5, 3, 4], [6, 7]
    layout = Layout.build(("x", "y"), prefix_lengths, content_lengths)
    N = layout.length
    ids = rng.integers(0, config.vocab_size, N)
    # content(1) repeats content(0)'s first tokens: same tokens at other positions.
    c0, c1 = layout.content(0), layout.content(1)
    ids[c1.start : c1.start + c0.length] = ids[c0.start : c0.end]
    capacity = 64
    _, cache = forward(
        params, jnp.asarray(ids[None], jnp.int32), jnp.arange(N, dtype=jnp.int32)[None], init_cache(config, 1, capacity),
        config, fresh=True,
    )
    return config, layout, cache, capacity


def test_dense_split_and_reassembled_equals_dense(dense):
    config, layout, cache, capacity = dense
    N = layout.length
    rope = jnp.asarray(rope_tables(config))
    np.testing.assert_array_equal(np.asarray(cache.positions)[0, :N], np.arange(N))

    def extract(span, frame0):
        return extract_segment(cache, span.start, span.length, rope, bucket=bucket_length(span.length),
                               frame0=frame0, impl="reference")

    prefix0 = extract(layout.prefix(0), frame0=False)
    placed = []
    for span in layout.after_prefix0():
        seg0 = extract(span, frame0=True)
        amounts = span.start + jnp.arange(seg0.bucket, dtype=jnp.int32)
        keys = rotate_keys(seg0.keys, amounts, rope, seg0.length, impl="reference")
        placed.append(seg0.replace(keys=keys))
    starts = jnp.asarray([s.start for s in layout.after_prefix0()], jnp.int32)
    assembled = assemble_cache(prefix0, placed, starts, jnp.int32(N - 1), capacity=capacity)

    np.testing.assert_array_equal(np.asarray(assembled.positions)[0, :N], np.arange(N))
    np.testing.assert_array_equal(np.asarray(assembled.lengths), [N - 1])
    for layer in range(config.num_layers):
        got_k = assembled.keys[layer, 0, :, :N]
        got_v = assembled.values[layer, 0, :, :N]
        assert _rel_err(got_k, cache.keys[layer, 0, :, :N]) < 1e-5, layer
        assert _rel_err(got_v, cache.values[layer, 0, :, :N]) < 1e-5, layer
        # Values are copied, never rotated: bit-identical.
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(cache.values[layer, 0, :, :N]))
    # Nothing but zeros past the prompt (every segment's padding is zero).
    assert not np.any(np.asarray(assembled.keys)[:, :, :, N:])


def test_frame0_layer0_keys_are_position_free(dense):
    """Layer-0 keys depend only on the token and its position, so in frame 0 the same tokens
    at two positions have the same keys; before de-rotation they differ. (Guards the round trip
    above against de-rotation and re-rotation both being no-ops.)"""
    config, layout, cache, _ = dense
    rope = jnp.asarray(rope_tables(config))
    c0, c1 = layout.content(0), layout.content(1)
    n = c0.length
    seg0 = extract_segment(cache, c0.start, n, rope, bucket=16, frame0=True, impl="reference")
    seg1 = extract_segment(cache, c1.start, n, rope, bucket=16, frame0=True, impl="reference")
    k0, k1 = np.asarray(seg0.keys)[0, :, :n], np.asarray(seg1.keys)[0, :, :n]
    assert _rel_err(k1, k0) < 1e-5
    raw0 = np.asarray(cache.keys)[0, 0, :, c0.start : c0.end]
    raw1 = np.asarray(cache.keys)[0, 0, :, c1.start : c1.start + n]
    assert _rel_err(raw1, raw0) > 1e-2
    # Values of layer 0 carry no position at all.
    np.testing.assert_allclose(np.asarray(seg1.values)[0, :, :n], np.asarray(seg0.values)[0, :, :n], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("apply_offsets", [True, False])
def test_the_one_program_reuse_step_equals_its_parts_called_apart(apply_offsets):
    """``build_reuse_cache`` = ``correct_segments_batch`` then ``assemble_cache_batch`` (and
    ``correction_sizes``) to float32 rounding (one program may fuse the arithmetic differently), on two rows of two placeholders with partly usable anchors."""
    rng = np.random.default_rng(3)
    A, T, TP, B, capacity = 3, 16, 16, 2, 128

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def seg(*lead, length):
        return SegmentKV(arr(*lead, L, H, T, D), arr(*lead, L, H, T, D), jnp.asarray(length, jnp.int32))

    inputs, starts, pos = [], [], 16
    for _ in range(2):
        deltas = ConsumerDeltas(arr(A, L, H, T, D), arr(A, L, H, T, D), arr(A, L, H, TP, D), arr(A, L, H, TP, D),
                                jnp.ones((A,), bool))
        anchors = AnchorInputs(arr(A, L, H, T, D), arr(A, L, H, T, D), jnp.asarray([16, 12, 16], jnp.int32),
                               jnp.asarray([[True, False, True], [True, True, True]]), deltas)
        lengths = [11, 14]
        inputs.append(PlaceholderInputs(seg(B, length=lengths), seg(length=9), jnp.asarray([pos, pos + 1], jnp.int32),
                                        jnp.asarray([pos + 11, pos + 15], jnp.int32), anchors))
        starts.append([[pos, pos + 11], [pos + 1, pos + 15]])
        pos += 40
    inputs = tuple(inputs)
    starts = jnp.asarray(np.concatenate([np.asarray(s) for s in starts], axis=1), jnp.int32)  # [B, 2P]
    prefix0, num_cached = seg(length=16), jnp.asarray([100, 104], jnp.int32)
    rope = jnp.asarray(rope_tables(tiny_config(num_layers=L, num_kv_heads=H, head_dim=D)))

    cache, sizes = build_reuse_cache(inputs, rope, prefix0, starts, num_cached, capacity=capacity,
                                     apply_offsets=apply_offsets, impl="reference", with_sizes=True)
    corrected = correct_segments_batch(inputs, rope, apply_offsets=apply_offsets, impl="reference")
    apart = assemble_cache_batch(prefix0, [s for pair in corrected for s in pair], starts, num_cached, capacity=capacity)
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(apart)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    want_sizes = correction_sizes(corrected, inputs, starts, capacity=capacity)
    np.testing.assert_allclose(np.asarray(sizes), np.asarray(want_sizes), rtol=1e-5, atol=1e-6)
    assert build_reuse_cache(inputs, rope, prefix0, starts, num_cached, capacity=capacity,
                             apply_offsets=apply_offsets, impl="reference")[1] is None
