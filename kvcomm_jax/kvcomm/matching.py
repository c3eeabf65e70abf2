"""Anchor matching weights and anchor prediction (docs/design.md §6 and §8).

All functions are jit-friendly, masked for padded tokens and unusable anchors,
and do their softmax in float32 with temperature 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvcomm_jax.kvcomm.segments import fit_tokens

TEMPERATURE = 1.0
ACTIVATION_MASS = 0.9


def _masked_softmax(distances: jax.Array, usable: jax.Array) -> jax.Array:
    """softmax over axis 0 of ``-distances / tau``, unusable anchors at -inf. ``usable`` broadcasts.

    All zero where no anchor is usable (no correction), never nan.
    """
    logits = jnp.where(usable, -distances / TEMPERATURE, -jnp.inf)
    return jnp.where(jnp.any(usable, axis=0, keepdims=True), jax.nn.softmax(logits, axis=0), 0.0)


def placeholder_weights(base, anchors, length, usable, anchor_lengths) -> jax.Array:
    """Per-token weights ``[A, 1, 1, T, 1]``.

    base: ``[L, H, T, D]``; anchors: ``[A, L, H, Ta, D]`` base KV of each anchor
    (``anchor_lengths [A]`` valid tokens); ``d[a, t] = mean_{l,h,c} |base[l,h,t,c] -
    anchors[a,l,h,t,c]|`` over the anchor's first T tokens. Token ``t`` is served only by
    usable anchors that cover it (``t < anchor_lengths[a]``); a token no anchor covers, and
    every ``t >= length``, gets weight 0 (no correction).
    """
    T = base.shape[2]
    a = fit_tokens(anchors, T).astype(jnp.float32)  # [A, L, H, T, D]
    d = jnp.mean(jnp.abs(base.astype(jnp.float32)[None] - a), axis=(1, 2, 4))  # [A, T]
    serves = usable[:, None] & (jnp.arange(T)[None, :] < anchor_lengths[:, None])  # [A, T]
    w = _masked_softmax(d, serves)  # [A, T]
    w = jnp.where((jnp.arange(T) < length)[None], w, 0.0)
    return w[:, None, None, :, None]


def prefix_weights(base, anchors, length, anchor_lengths, usable) -> jax.Array:
    """Per-channel weights ``[A, L, H, 1, D]``.

    ``d[a, l, h, c] = || base[l,h,:length,c] - anchors[a,l,h,Ta-length:Ta,c] ||_2``:
    the content against each anchor's *last* ``length`` tokens (``Ta`` = that
    anchor's own length). An anchor shorter than the content is compared over the
    content's last ``Ta`` tokens, the distance scaled by ``sqrt(length / Ta)`` to the
    full length.
    """
    T = base.shape[2]
    t = jnp.arange(T)
    at = anchor_lengths[:, None] - length + t[None]  # [A, T] anchor token facing content token t
    base = base.astype(jnp.float32)

    def squared_distance(anchor, facing):  # [L, H, Ta, D], [T] -> [L, H, D]
        tail = jnp.take(anchor, jnp.clip(facing, 0, anchor.shape[2] - 1), axis=2).astype(jnp.float32)  # [L, H, T, D]
        sq = jnp.where(((t < length) & (facing >= 0))[None, None, :, None], jnp.square(base - tail), 0.0)
        return jnp.sum(sq, axis=2)

    # One anchor at a time: a gathered tail per anchor (and per row, under vmap) would hold A whole contents at once.
    sq = jax.lax.map(lambda x: squared_distance(*x), (anchors, at))  # [A, L, H, D]
    covered = jnp.clip(jnp.minimum(anchor_lengths, length), 1, None).astype(jnp.float32)  # [A]
    d = jnp.sqrt(sq * (length / covered)[:, None, None, None])  # [A, L, H, D]
    return _masked_softmax(d, usable[:, None, None, None])[:, :, :, None, :]


@functools.partial(jax.jit, static_argnames=("coverage",))
def predict(values, length, anchor_values, anchor_lengths, anchor_valid, gamma, coverage: bool = False):
    """May a content be reused? (section 8)

    values: ``[L, H, T, D]`` the content's base values (``length`` valid tokens);
    anchor_values: ``[V, L, H, Ta, D]``; anchor_lengths ``[V]``; anchor_valid ``[V]``.

    Returns ``(becomes_anchor bool, activation_increments [V] int32, entropy float32)``.
    Fewer than two anchors at least ``length`` long (any length with ``coverage``: shorter
    anchors serve the tokens they cover) -> becomes an anchor.
    Otherwise ``s = softmax(-||values - anchor||_F)``, ``H = -sum s log2 s``;
    ``H > gamma * log2(#available)`` -> becomes an anchor, else shareable and the
    smallest set of top anchors whose weights reach 0.9 each get +1 activation.
    """
    T = values.shape[2]
    available = anchor_valid & ((anchor_lengths >= length) | coverage)  # [V]
    count = jnp.sum(available)
    a = fit_tokens(anchor_values, T).astype(jnp.float32)
    sq = jnp.where((jnp.arange(T) < length)[None, None, None, :, None], jnp.square(values.astype(jnp.float32)[None] - a), 0.0)
    d = jnp.sqrt(jnp.sum(sq, axis=(1, 2, 3, 4)))  # [V]
    s = _masked_softmax(d, available)  # [V]
    entropy = -jnp.sum(jnp.where(available & (s > 0), s * jnp.log2(jnp.where(s > 0, s, 1.0)), 0.0))
    becomes_anchor = (count < 2) | (entropy > gamma * jnp.log2(jnp.maximum(count, 1).astype(jnp.float32)))
    order = jnp.argsort(-jnp.where(available, s, -1.0))  # best first
    sorted_s = s[order]
    selected_sorted = ((jnp.cumsum(sorted_s) - sorted_s) < ACTIVATION_MASS) & available[order]
    increments = jnp.zeros_like(anchor_lengths).at[order].set(selected_sorted.astype(jnp.int32))
    increments = jnp.where(becomes_anchor, 0, increments)
    return becomes_anchor, increments, entropy
