"""The reuse path's array work: offset approximation per placeholder, then cache assembly.

Two jitted calls per agent call, each unrolled over the agent's placeholders at
trace time (no Python loop runs per layer, anchor or token):

* :func:`correct_segments` computes the matching weights and the corrected,
  re-positioned KV of every placeholder content and of the prefix segment after
  it (kvcomm_algorithm.md sections 6-7), through the Pallas kernel dispatch;
* :func:`assemble_cache` writes prefix 0 and those segments into one KV cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvcomm_jax.kvcomm.matching import placeholder_weights, prefix_weights
from kvcomm_jax.kvcomm.segments import SegmentKV, fit_tokens
from kvcomm_jax.model.kv_cache import KVCache, with_lengths, write_span
from pallas_kernels import apply_correction, correct_and_rotate_keys, rotate_keys


@struct.dataclass
class PlaceholderInputs:
    """Everything needed to correct one placeholder and its following prefix segment for one consumer.

    content:        base KV of the content, frame 0, ``[L, H, Tc, D]``
    prefix:         template base KV of the consumer's prefix segment after it, frame 0, ``[L, H, Tp, D]``
    content_start:  int32, position of the content's first token in the real prompt
    prefix_start:   int32, position of the prefix segment's first token
    anchor_keys, anchor_values: ``[V, L, H, Ta, D]`` anchors' base KV (keys frame 0)
    anchor_lengths: ``[V]`` int32
    usable:         ``[V]`` bool, anchors that hold this consumer's deltas and are long enough
    ph_keys, ph_values: ``[V, L, H, Ta, D]`` placeholder deltas for this consumer
    pf_keys, pf_values: ``[V, L, H, Tp, D]`` prefix deltas for this consumer
    """

    content: SegmentKV
    prefix: SegmentKV
    content_start: jax.Array
    prefix_start: jax.Array
    anchor_keys: jax.Array
    anchor_values: jax.Array
    anchor_lengths: jax.Array
    usable: jax.Array
    ph_keys: jax.Array
    ph_values: jax.Array
    pf_keys: jax.Array
    pf_values: jax.Array


def _positions(segment: SegmentKV, start):
    return start + jnp.arange(segment.bucket, dtype=jnp.int32)  # [T]


def _place(segment: SegmentKV, start, inv_freq, impl) -> SegmentKV:
    """Rotate a frame-0 segment's keys to positions ``start + t`` without correcting it."""
    keys = rotate_keys(segment.keys, _positions(segment, start), inv_freq, segment.length, impl=impl)
    return segment.replace(keys=keys)


def _correct(segment: SegmentKV, start, k_weights, v_weights, k_deltas, v_deltas, usable, inv_freq, impl) -> SegmentKV:
    """Corrected keys rotated to ``start + t`` (one fused pass) and corrected values."""
    keys = correct_and_rotate_keys(
        segment.keys, k_deltas, k_weights, usable, _positions(segment, start), inv_freq, segment.length, impl=impl
    )
    values = apply_correction(segment.values, v_deltas, v_weights, usable, impl=impl)
    return SegmentKV(keys, values, segment.length)


def _correct_one(p: PlaceholderInputs, inv_freq, impl):
    c, f = p.content, p.prefix
    T = c.bucket
    ph_k, ph_v = fit_tokens(p.ph_keys, T), fit_tokens(p.ph_values, T)
    content = _correct(
        c,
        p.content_start,
        placeholder_weights(c.keys, p.anchor_keys, c.length, p.usable),
        placeholder_weights(c.values, p.anchor_values, c.length, p.usable),
        ph_k,
        ph_v,
        p.usable,
        inv_freq,
        impl,
    )
    prefix = _correct(
        f,
        p.prefix_start,
        prefix_weights(c.keys, p.anchor_keys, c.length, p.anchor_lengths, p.usable),
        prefix_weights(c.values, p.anchor_values, c.length, p.anchor_lengths, p.usable),
        p.pf_keys,
        p.pf_values,
        p.usable,
        inv_freq,
        impl,
    )
    return content, prefix


@functools.partial(jax.jit, static_argnames=("apply_offsets", "impl"))
def correct_segments(inputs: tuple[PlaceholderInputs, ...], inv_freq, *, apply_offsets: bool, impl: str = "auto"):
    """For each placeholder: ``(content, prefix)`` segments with keys at their real positions.

    With ``apply_offsets=False`` (the ``rotate_only`` ablation) the bases are
    only re-positioned. Layer 0 is never corrected (the kernels keep it).
    """
    if not apply_offsets:
        return tuple(
            (_place(p.content, p.content_start, inv_freq, impl), _place(p.prefix, p.prefix_start, inv_freq, impl))
            for p in inputs
        )
    return tuple(_correct_one(p, inv_freq, impl) for p in inputs)


@functools.partial(jax.jit, static_argnames=("capacity",))
def assemble_cache(prefix0: SegmentKV, segments, starts, num_cached, *, capacity: int) -> KVCache:
    """One-row cache ``[L, 1, H, capacity, D]`` holding prefix 0 then each segment at ``starts[i]``.

    Segments are written in order with :func:`~kvcomm_jax.model.kv_cache.write_span`, so each
    one's padding is overwritten by the next; a segment starting at ``s`` holds positions
    ``s, s+1, ...``; ``lengths = num_cached``. The caller guarantees
    ``starts[i] + bucket_i <= capacity``.
    """
    L, H, _, D = prefix0.keys.shape
    zeros = jnp.zeros((L, 1, H, capacity, D), prefix0.keys.dtype)
    cache = KVCache(zeros, zeros, jnp.zeros((1, capacity), jnp.int32), jnp.zeros((1,), jnp.int32))
    for segment, start in zip((prefix0, *segments), (0, *starts)):
        cache = write_span(cache, 0, start, segment.keys, segment.values, _positions(segment, start))
    return with_lengths(cache, num_cached)
