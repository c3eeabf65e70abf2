"""Anchor pool, matching weights and prediction on hand-made arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.kvcomm.anchor_pool import (
    ConsumerDeltas,
    add_activations,
    empty_pool,
    insert_anchor,
    record_deltas,
)
from kvcomm_jax.kvcomm.matching import placeholder_weights, predict, prefix_weights
from kvcomm_jax.kvcomm.reuse import (
    AnchorInputs,
    PlaceholderInputs,
    correct_segments_batch,
)
from kvcomm_jax.kvcomm.segments import SegmentKV
from kvcomm_jax.kvcomm.slot_book import SlotBook

L, H, D = 2, 1, 4


def _kv(value, tokens=8):
    return jnp.full((L, H, tokens, D), value, jnp.float32)


def _pool(capacity=5, tokens=16):
    return empty_pool(capacity, L, H, D, tokens, jnp.float32)


def _filled(values, length=8, capacity=4, window=2):
    """A pool (and its book) with one ``length``-token anchor per value, in order."""
    pool, book = _pool(capacity=capacity), SlotBook.empty(capacity)
    for value in values:
        pool, _ = insert_anchor(pool, book, _kv(value, length), _kv(value, length), length, window=window)
    return pool, book


def _assert_published(pool, book):
    """The pool's device bookkeeping is exactly the host book."""
    for field in ("lengths", "valid", "activations", "ages"):
        np.testing.assert_array_equal(np.asarray(getattr(pool, field)), getattr(book, field), err_msg=field)
    assert int(pool.next_age) == book.next_age
    assert sorted(pool.consumers) == sorted(book.present)
    for key, deltas in pool.consumers.items():
        np.testing.assert_array_equal(np.asarray(deltas.present), book.present[key], err_msg=key)


def test_capacity_is_never_exceeded():
    pool, book = empty_pool(5, L, H, D, 16, jnp.float32, slots=1), SlotBook.empty(1)
    seen_slots = []
    for i in range(30):
        pool, slot = insert_anchor(pool, book, _kv(i), _kv(i), 8, window=2)
        assert 0 <= slot < 5
        assert int(book.valid.sum()) == min(i + 1, 5) and book.slots == pool.slots
        seen_slots.append(pool.slots)
    _assert_published(pool, book)
    assert seen_slots[:6] == [1, 2, 4, 4, 5, 5]  # allocation doubles, capped at the capacity
    assert max(seen_slots) == 5


def test_eviction_takes_least_activated_among_window_oldest():
    pool, book = _filled(range(4), window=3)
    # ages 0..3 in slots 0..3; the 3 oldest are slots 0, 1, 2
    pool = add_activations(pool, book, [5, 1, 3, 0])
    assert book.choose_slot(window=3, capacity=4) == 1  # slot 3 has fewer activations but is not among the 3 oldest
    pool, slot = insert_anchor(pool, book, _kv(9), _kv(9), 8, window=3)
    assert slot == 1 and float(pool.keys[1, 0, 0, 0, 0]) == 9.0 and int(pool.activations[1]) == 0
    _assert_published(pool, book)
    # ties go to the oldest
    _, tied = _filled(range(3), capacity=3, window=3)
    assert tied.choose_slot(window=3, capacity=3) == 0


def test_eviction_clears_the_evicted_anchors_deltas():
    pool, book = _pool(capacity=1), SlotBook.empty(1)
    pool, slot = insert_anchor(pool, book, _kv(1), _kv(1), 8, window=1)
    pool = record_deltas(pool, book, slot, 7, _kv(0.5), _kv(0.5), _kv(0.1, 4), _kv(0.1, 4))
    assert book.usable_for(7, 8).tolist() == [True] and book.holds_deltas(7)
    _assert_published(pool, book)
    pool, _ = insert_anchor(pool, book, _kv(2), _kv(2), 8, window=1)
    assert book.usable_for(7, 8).tolist() == [False] and not book.holds_deltas(7)
    _assert_published(pool, book)


def test_anchor_without_consumer_deltas_or_too_short_is_not_usable():
    pool, book = _pool(capacity=3), SlotBook.empty(3)
    pool, a = insert_anchor(pool, book, _kv(1), _kv(1), 8, window=3)
    pool, b = insert_anchor(pool, book, _kv(2), _kv(2), 5, window=3)
    pool = record_deltas(pool, book, a, 0, _kv(0), _kv(0), _kv(0, 4), _kv(0, 4))
    pool = record_deltas(pool, book, b, 0, _kv(0), _kv(0), _kv(0, 4), _kv(0, 4))
    assert book.usable_for(0, 6).tolist() == [True, False, False]  # b is only 5 tokens long
    assert book.usable_for(1, 1).tolist() == [False, False, False]  # consumer 1 recorded nothing


def test_a_restored_pools_book_is_read_back_once_and_equals_the_original():
    pool, book = _filled((1.0, 2.0, 3.0), capacity=4)
    pool = record_deltas(pool, book, 1, 3, _kv(0), _kv(0), _kv(0, 4), _kv(0, 4))
    pool = add_activations(pool, book, [2, 0, 1, 0])
    read = SlotBook.read(pool)
    _assert_published(pool, read)
    _assert_published(pool, book)
    assert read.activations.tolist() == [2, 0, 1, 0] and read.next_age == 3
    assert read.present["3"].tolist() == [False, True, False, False]


def test_pool_grows_its_token_axis_for_longer_content():
    pool, book = _pool(tokens=16), SlotBook.empty(5)
    pool, _ = insert_anchor(pool, book, _kv(1, 40), _kv(1, 40), 40, window=2)
    assert pool.token_capacity == 64 and int(pool.lengths[0]) == 40


def test_fewer_than_two_long_enough_anchors_means_new_anchor():
    pool, book = _pool(capacity=4), SlotBook.empty(4)
    becomes, inc, _ = predict(_kv(1), 8, pool.values, pool.lengths, pool.valid, 0.3)
    assert bool(becomes) and int(inc.sum()) == 0
    pool, _ = insert_anchor(pool, book, _kv(1), _kv(1), 8, window=2)
    pool, _ = insert_anchor(pool, book, _kv(2), _kv(2), 4, window=2)  # too short for an 8-token content
    becomes, _, _ = predict(_kv(1), 8, pool.values, pool.lengths, pool.valid, 0.3)
    assert bool(becomes)


def test_low_entropy_content_is_shareable_and_counts_the_top_anchor():
    pool, _ = _filled((1.0, 3.0, 6.0))
    becomes, inc, entropy = predict(_kv(1.05), 8, pool.values, pool.lengths, pool.valid, 0.3)
    assert not bool(becomes) and float(entropy) < 0.01
    assert inc.tolist() == [1, 0, 0, 0]


def test_high_entropy_content_becomes_anchor_and_mass_set_is_counted():
    pool, _ = _filled((1.0, 1.0, 1.0))
    becomes, inc, entropy = predict(_kv(1.0), 8, pool.values, pool.lengths, pool.valid, 0.3)
    assert bool(becomes) and float(entropy) == pytest.approx(np.log2(3), rel=1e-5) and int(inc.sum()) == 0
    # with gamma above 1 the same content is shareable, and 0.9 of the mass needs all three anchors
    becomes, inc, _ = predict(_kv(1.0), 8, pool.values, pool.lengths, pool.valid, 1.5)
    assert not bool(becomes) and inc.tolist() == [1, 1, 1, 0]


def test_matching_weights_ignore_unusable_anchors_and_padding():
    base = _kv(1.0)
    anchors = jnp.stack([_kv(1.0, 16), _kv(1.0, 16), _kv(50.0, 16)])  # [3, L, H, 16, D]
    usable = jnp.asarray([True, False, True])
    w = placeholder_weights(base, anchors, 5, usable, jnp.asarray([16, 16, 16]))  # [3, 1, 1, 8, 1]
    assert w.shape == (3, 1, 1, 8, 1)
    np.testing.assert_allclose(w[:, 0, 0, :5, 0], [[1.0] * 5, [0.0] * 5, [0.0] * 5], atol=1e-6)
    assert float(jnp.abs(w[:, 0, 0, 5:, 0]).sum()) == 0.0
    pw = prefix_weights(base, anchors, 5, jnp.asarray([16, 16, 16]), usable)  # [3, L, H, 1, D]
    assert pw.shape == (3, L, H, 1, D)
    np.testing.assert_allclose(pw[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(pw[1], 0.0, atol=1e-6)


def test_prefix_weights_compare_against_each_anchors_last_tokens():
    base = _kv(2.0, 8)
    first_half_match = jnp.concatenate([_kv(2.0, 4), _kv(9.0, 4)], axis=2)  # matches at its start only
    last_half_match = jnp.concatenate([_kv(9.0, 4), _kv(2.0, 4)], axis=2)  # matches at its end
    anchors = jnp.stack([first_half_match, last_half_match])
    pw = prefix_weights(base, anchors, 4, jnp.asarray([8, 8]), jnp.asarray([True, True]))
    assert float(pw[1].min()) > 0.99


def test_short_anchors_serve_only_the_tokens_they_cover():
    base = _kv(1.0)
    anchors = jnp.stack([_kv(1.0, 16), _kv(1.0, 16)])  # [2, L, H, 16, D]
    w = placeholder_weights(base, anchors, 8, jnp.asarray([True, True]), jnp.asarray([3, 6]))
    np.testing.assert_allclose(w[:, 0, 0, :, 0], [[0.5] * 3 + [0.0] * 5, [0.5] * 3 + [1.0] * 3 + [0.0] * 2], atol=1e-6)


def test_prefix_weights_scale_a_short_anchors_distance_to_the_full_length():
    base = _kv(2.0, 8)
    short = _kv(3.0, 8)  # differs by 1 everywhere, but holds only 2 tokens
    full = _kv(3.0, 8)  # differs by 1 over all 4 compared tokens
    pw = prefix_weights(base, jnp.stack([short, full]), 4, jnp.asarray([2, 8]), jnp.asarray([True, True]))
    np.testing.assert_allclose(pw[:, 0, 0, 0, 0], [0.5, 0.5], atol=1e-6)  # same per-token distance, same weight


def test_coverage_lets_shorter_anchors_pass_the_length_gate():
    pool, _ = _filled((1.0, 1.02, 5.0), length=4)  # 4-token anchors
    content = _kv(1.01)
    becomes, _, _ = predict(content, 8, pool.values, pool.lengths, pool.valid, 1.0)
    assert bool(becomes)  # the paper's gate: no anchor is 8 tokens long
    becomes, increments, _ = predict(content, 8, pool.values, pool.lengths, pool.valid, 1.0, coverage=True)
    assert not bool(becomes) and increments.tolist()[2] == 0


def test_a_batched_correction_never_holds_every_anchors_gathered_tail_at_once():
    """The prefix weights compare each row's content with each anchor's last tokens; the batched
    correction's scratch memory stays far below one gathered ``[B, A, L, H, T, D]`` tail (which at
    the default model's size, 10 rows, 20 anchors and 512 tokens, was 9.4 GB)."""
    B, A, L, H, T, D, TP = 8, 8, 2, 2, 256, 16, 16

    def spec(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype)

    deltas = ConsumerDeltas(spec(A, L, H, T, D), spec(A, L, H, T, D), spec(A, L, H, TP, D), spec(A, L, H, TP, D),
                            spec(A, dtype=bool))
    anchors = AnchorInputs(spec(A, L, H, T, D), spec(A, L, H, T, D), spec(A, dtype=jnp.int32), spec(B, A, dtype=bool), deltas)
    inputs = (PlaceholderInputs(
        SegmentKV(spec(B, L, H, T, D), spec(B, L, H, T, D), spec(B, dtype=jnp.int32)),
        SegmentKV(spec(L, H, TP, D), spec(L, H, TP, D), spec(dtype=jnp.int32)),
        spec(B, dtype=jnp.int32), spec(B, dtype=jnp.int32), anchors,
    ),)
    compiled = correct_segments_batch.lower(inputs, spec(L, D // 2), apply_offsets=True, impl="reference").compile()
    gathered_tail = B * A * L * H * T * D * 4
    assert compiled.memory_analysis().temp_size_in_bytes < gathered_tail / 4
