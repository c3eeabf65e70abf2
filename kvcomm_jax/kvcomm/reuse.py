"""The reuse path's array work: offset approximation per placeholder, then cache assembly.

One program per batched reuse step (:func:`build_reuse_cache`), unrolled over the
agent's placeholders at trace time (no Python loop runs per layer, anchor or token),
so the corrected segments are written into the cache without leaving it:

* :func:`correct_segments` computes the matching weights and the corrected,
  re-positioned KV of every placeholder content and of the prefix segment after
  it (docs/design.md §6-7), through the Pallas kernel dispatch;
* :func:`assemble_cache` writes prefix 0 and those segments into one KV cache;
* :func:`correction_sizes`, when a selection rule needs it, scores each token by how
  far the correction moved it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from kvcomm_jax.kvcomm.anchor_pool import ANCHOR_AXES, SLOT_AXES, ConsumerDeltas
from kvcomm_jax.kvcomm.matching import placeholder_weights, prefix_weights
from kvcomm_jax.kvcomm.segments import SegmentKV, fit_tokens
from kvcomm_jax.model.kv_cache import KVCache, with_lengths, write_span
from pallas_kernels import apply_correction, correct_and_rotate_keys, rotate_keys


@struct.dataclass
class AnchorInputs:
    """A placeholder's anchors as one consumer sees them (``V`` slots, ``Ta`` pool tokens).

    keys, values: ``[V, L, H, Ta, D]`` anchors' base KV (keys frame 0)
    lengths:      ``[V]`` int32
    usable:       ``[V]`` bool, anchors that hold this consumer's deltas and may serve the content
    deltas:       the consumer's :class:`~kvcomm_jax.kvcomm.anchor_pool.ConsumerDeltas`
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    usable: jax.Array
    deltas: ConsumerDeltas

    logical_axes = {"keys": ANCHOR_AXES, "values": ANCHOR_AXES, "lengths": SLOT_AXES, "usable": SLOT_AXES}


@struct.dataclass
class PlaceholderInputs:
    """Everything needed to correct one placeholder and its following prefix segment for one consumer.

    content:        base KV of the content, frame 0, ``[L, H, Tc, D]``
    prefix:         template base KV of the consumer's prefix segment after it, frame 0, ``[L, H, Tp, D]``
    content_start:  int32, position of the content's first token in the real prompt
    prefix_start:   int32, position of the prefix segment's first token
    anchors:        :class:`AnchorInputs`
    """

    content: SegmentKV
    prefix: SegmentKV
    content_start: jax.Array
    prefix_start: jax.Array
    anchors: AnchorInputs

    logical_axes = {}  # segments and anchors declare their own; the starts are replicated


def _positions(segment: SegmentKV, start):
    return start + jnp.arange(segment.bucket, dtype=jnp.int32)  # [T]


def _reposition(segment: SegmentKV, start, rope, impl, mesh) -> SegmentKV:
    """Rotate a frame-0 segment's keys to positions ``start + t`` without correcting it."""
    keys = rotate_keys(segment.keys, _positions(segment, start), rope, segment.length, impl=impl, mesh=mesh)
    return segment.replace(keys=keys)


def _correct(
    segment: SegmentKV, start, k_weights, v_weights, k_deltas, v_deltas, usable, rope, impl, mesh
) -> SegmentKV:
    """Corrected keys rotated to ``start + t`` (one fused pass) and corrected values."""
    positions = _positions(segment, start)  # [T]
    keys = correct_and_rotate_keys(
        segment.keys, k_deltas, k_weights, usable, positions, rope, segment.length, impl=impl, mesh=mesh
    )
    values = apply_correction(segment.values, v_deltas, v_weights, usable, impl=impl, mesh=mesh)
    return SegmentKV(keys, values, segment.length)


def _correct_one(p: PlaceholderInputs, rope, impl, mesh):
    c, a, deltas = p.content, p.anchors, p.anchors.deltas
    T = c.bucket
    content = _correct(
        c,
        p.content_start,
        placeholder_weights(c.keys, a.keys, c.length, a.usable, a.lengths),
        placeholder_weights(c.values, a.values, c.length, a.usable, a.lengths),
        fit_tokens(deltas.placeholder_keys, T),
        fit_tokens(deltas.placeholder_values, T),
        a.usable,
        rope,
        impl,
        mesh,
    )
    prefix = _correct(
        p.prefix,
        p.prefix_start,
        prefix_weights(c.keys, a.keys, c.length, a.lengths, a.usable),
        prefix_weights(c.values, a.values, c.length, a.lengths, a.usable),
        deltas.prefix_keys,
        deltas.prefix_values,
        a.usable,
        rope,
        impl,
        mesh,
    )
    return content, prefix


@functools.partial(jax.jit, static_argnames=("apply_offsets", "impl", "mesh"))
def correct_segments(
    inputs: tuple[PlaceholderInputs, ...], rope, *, apply_offsets: bool, impl: str = "auto", mesh: Mesh | None = None
):
    """For each placeholder: ``(content, prefix)`` segments with keys at their real positions.

    ``rope``: per-layer RoPE frequency tables ``[L, D/2]``. With ``apply_offsets=False``
    (the ``rotate_only`` ablation) the bases are only re-positioned. Layer 0 is never
    corrected (the kernels keep it). ``impl`` and ``mesh`` go to the kernels (a mesh of
    several devices runs them per device).
    """
    if not apply_offsets:
        return tuple(
            (
                _reposition(p.content, p.content_start, rope, impl, mesh),
                _reposition(p.prefix, p.prefix_start, rope, impl, mesh),
            )
            for p in inputs
        )
    return tuple(_correct_one(p, rope, impl, mesh) for p in inputs)


@functools.partial(jax.jit, static_argnames=("capacity",))
def assemble_cache(prefix0: SegmentKV, segments, starts, num_cached, *, capacity: int) -> KVCache:
    """One-row cache ``[L, 1, H, capacity, D]`` holding prefix 0 then each segment at ``starts[i]``.

    :func:`assemble_cache_batch` of one row: segments ``[L, H, T, D]``, ``starts [len(segments)]``,
    ``num_cached`` a scalar.
    """
    rows = [segment.replace(keys=segment.keys[None], values=segment.values[None]) for segment in segments]
    return assemble_cache_batch(prefix0, rows, starts[None], jnp.reshape(num_cached, (1,)), capacity=capacity)


def _row_axes(inputs: PlaceholderInputs) -> PlaceholderInputs:
    """``vmap`` axes of a batch of rows: contents, starts and usability per row; template prefix and pool shared."""
    anchors = AnchorInputs(keys=None, values=None, lengths=None, usable=0, deltas=None)
    return PlaceholderInputs(content=0, prefix=None, content_start=0, prefix_start=0, anchors=anchors)


@functools.partial(jax.jit, static_argnames=("apply_offsets", "impl", "mesh"))
def correct_segments_batch(
    inputs: tuple[PlaceholderInputs, ...], rope, *, apply_offsets: bool, impl: str = "auto", mesh: Mesh | None = None
):
    """:func:`correct_segments` for ``B`` rows at once.

    Each input holds a leading ``B`` axis on ``content`` (``[B, L, H, Tc, D]``, one bucket for
    all rows), ``content_start``, ``prefix_start`` (``[B]``) and ``anchors.usable``
    (``[B, V]``); the template prefix and the pool arrays are shared. Returns one
    ``(content, prefix)`` pair per placeholder, each with a leading ``B`` axis.
    """
    correct = functools.partial(correct_segments, apply_offsets=apply_offsets, impl=impl, mesh=mesh)
    return jax.vmap(correct, in_axes=(tuple(_row_axes(p) for p in inputs), None))(inputs, rope)


@functools.partial(jax.jit, static_argnames=("capacity",))
def assemble_cache_batch(prefix0: SegmentKV, segments, starts, num_cached, *, capacity: int) -> KVCache:
    """A cache ``[L, B, H, capacity, D]`` holding, in each row, prefix 0 then each segment at ``starts[b, i]``.

    ``prefix0`` is shared; each of ``segments`` has a leading ``B`` axis (keys, values
    ``[B, L, H, T, D]``); ``starts [B, len(segments)]``; ``num_cached [B]``. Segments are
    written in order, row by row, with :func:`~kvcomm_jax.model.kv_cache.write_span` into the
    cache's own layout (no per-row caches to stack), so each one's padding is overwritten by
    the next; a segment starting at ``s`` holds positions ``s, s+1, ...``. The caller
    guarantees ``starts[b, i] + bucket_i <= capacity``.
    """
    L, H, _, D = prefix0.keys.shape
    B = starts.shape[0]
    zeros = jnp.zeros((L, B, H, capacity, D), prefix0.keys.dtype)
    cache = KVCache(zeros, zeros, jnp.zeros((B, capacity), jnp.int32), jnp.zeros((B,), jnp.int32))
    for b in range(B):
        cache = write_span(cache, b, 0, prefix0.keys, prefix0.values, _positions(prefix0, 0))
        for i, segment in enumerate(segments):
            start = starts[b, i]
            cache = write_span(cache, b, start, segment.keys[b], segment.values[b], _positions(segment, start))
    return with_lengths(cache, num_cached)


@functools.partial(jax.jit, static_argnames=("capacity",))
def correction_sizes(corrected, inputs: tuple[PlaceholderInputs, ...], starts, *, capacity: int):
    """How much the correction moved each reused token: ``[B, capacity]`` float32, 0 outside the segments.

    Per token, the norm over layers, heads and channels of ``corrected - base`` values.
    ``corrected``: :func:`correct_segments_batch`'s pairs for ``inputs``; ``starts [B, 2P]``
    where each segment begins (prompt order, as for :func:`assemble_cache_batch`).
    """
    def size(segment: SegmentKV, base_values):  # [B, L, H, T, D] -> [B, T]
        moved = segment.values.astype(jnp.float32) - base_values.astype(jnp.float32)
        return jnp.sqrt(jnp.sum(jnp.square(moved), axis=(1, 2, 4)))

    sizes = []
    for (content, prefix), p in zip(corrected, inputs):
        sizes += [size(content, p.content.values), size(prefix, p.prefix.values[None])]
    out = jnp.zeros((starts.shape[0], capacity), jnp.float32)  # [B, S]
    for i, s in enumerate(sizes):
        out = jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice_in_dim(row, new, at, axis=0))(out, s, starts[:, i])
    return out


@functools.partial(jax.jit, static_argnames=("capacity", "apply_offsets", "impl", "mesh", "with_sizes"))
def build_reuse_cache(
    inputs: tuple[PlaceholderInputs, ...], rope, prefix0: SegmentKV, starts, num_cached, *, capacity: int,
    apply_offsets: bool, impl: str = "auto", mesh: Mesh | None = None, with_sizes: bool = False,
):
    """A batched reuse step's cache in one program: ``(cache [L, B, H, capacity, D], sizes [B, capacity] or None)``.

    :func:`correct_segments_batch` over ``inputs`` (rows as it describes), then
    :func:`assemble_cache_batch` of ``prefix0`` and the corrected segments at ``starts
    [B, 2P]`` (prompt order) with ``num_cached [B]``; with ``with_sizes``, also
    :func:`correction_sizes`. Equal to the three called one after another (to float32
    rounding: XLA may fuse the arithmetic differently), without the corrected segments
    materialising between programs.
    """
    corrected = correct_segments_batch(inputs, rope, apply_offsets=apply_offsets, impl=impl, mesh=mesh)
    segments = [segment for pair in corrected for segment in pair]
    cache = assemble_cache_batch(prefix0, segments, starts, num_cached, capacity=capacity)
    sizes = correction_sizes(corrected, inputs, starts, capacity=capacity) if with_sizes else None
    return cache, sizes
