"""Blocked causal attention: flash-style online softmax over key blocks, in plain ``jnp``.

``T`` new tokens (queries, and the keys/values they just produced) may follow a cache
whose row ``b`` already holds ``starts[b]`` valid slots. Query ``t`` of row ``b`` sees
every cached slot ``< starts[b]`` and the new tokens ``0 .. t`` (its own key and the ones
before it): the same keys as ``slot <= starts[b] + t`` over the cache once the new keys
are written, but read from where they already are, so the cache is read before it is
written and the caller can update it in place afterwards.

Queries are split into blocks of ``q_block`` tokens. Query block ``i`` runs one
online-softmax pass over the cache's key blocks up to the longest row
(``ceil(max(starts) / k_block)`` blocks, none for a fresh prefill) and one over the new
tokens' key blocks up to its own causal diagonal, each a ``lax.fori_loop`` whose trip
count is computed at run time: key blocks after the diagonal, cache slots past the
longest row and query blocks that hold only padding (past the longest row's ``num_new``)
are never touched. The scores only ever exist per block pair (``[B, Hkv, G, q_block,
k_block]`` float32); scores, running max and sum and the output accumulate in float32,
so results differ from a full softmax only by float reassociation. Every query sees at
least its own key, so no softmax row is empty.

Why not ``jax.nn.dot_product_attention``: on XLA:CPU it materialises the full ``[B, Hq, T,
S]`` scores and skips neither causal nor padded blocks. ``scripts/bench_attention.py``
measures one layer at the default model's shapes (9 query / 3 KV heads, head_dim 64, one
row) on the 2-core CPU: a causal prefill of 1024 tokens takes 66 ms with it, 57 ms with
the full-matrix softmax and 17 ms blocked; 3072 tokens 596, 442 and 97 ms. One decode
query over 1000 valid of 4096 slots: 1.34, 0.64 and 0.31 ms; over 1100 of 1280 slots all
three are about 0.3 ms (docs/model_benchmarks.md).

Block sizes (module constants):

* ``Q_BLOCK = 256`` queries per block. Decode and the one-token reuse step have ``T = 1``:
  a single block, run without a query loop.
* ``K_BLOCK = 512`` key slots per block for query blocks of more than
  ``SMALL_QUERY_BLOCK = 16`` queries. In the whole model's prefill, 256 x 512 was the
  fastest of 128 x 128, 256 x 256, 512 x 512, 256 x 512, 256 x 1024 and 512 x 1024 at 1024,
  2048 and 3072 tokens (by 1 to 19%).
* ``DECODE_K_BLOCK = 1024`` key slots per block for smaller query blocks (decode, the
  one-token reuse step), whose scores are tiny, so few large blocks cost least: per
  decode step near a full cache of 3328 slots, blocks of 256 / 512 / 1024 / all 3328 took
  59 / 55 / 48 / 49 ms; 1000 valid of 4096 slots took 33 ms with 512-slot blocks and
  60 ms reading all of them.

Gemma's extras: a ``scale`` other than ``1/sqrt(D)``, tanh soft-capping of the scores
(``logit_cap``) and a :class:`SlidingWindow`, which hides keys by position (not slot):
every block is still read, and the window only masks (a cache's slots need not be in
position order, so a block's positions are not known before it is read).

A length that is not a multiple of its block keeps the block size: the last block is read
at ``length - block`` instead (a slice never runs past the end of a buffer), and the slots
an earlier block already covered are masked out of it (keys), or computed again to the
same values (queries). So an exact prompt length of any size, a prime one included, runs
in blocks of the preferred size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Q_BLOCK = 256
K_BLOCK = 512
DECODE_K_BLOCK = 1024
SMALL_QUERY_BLOCK = 16

_NO_MAX = float(jnp.finfo(jnp.float32).min)  # running max before any key: finite, so exp(m - m_new) is never nan

ReadBlock = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]  # (start, size) -> keys, values [B, Hkv, size, D]


class KeySource(NamedTuple):
    """Keys/values read block by block, and which of them a query block sees.

    read:    ``(start, size) -> (keys, values)``, each ``[B, Hkv, size, D]``
    length:  slots ``read`` can serve (static)
    visible: ``(query_indices [Tq], key_slots [Tk]) -> bool [B or 1, Tq or 1, Tk]``
    end:     int32 (traced): no query needs a slot ``>= end`` (the longest row)
    """

    read: ReadBlock
    length: int
    visible: Callable[[jax.Array, jax.Array], jax.Array]
    end: jax.Array


class SlidingWindow(NamedTuple):
    """A key at position ``p`` is visible to a query at position ``q`` only if ``q - size < p``.

    size:            int32 scalar (traced: one value per scanned layer; a global layer
                     passes a size larger than any position)
    positions:       ``[B, T]`` positions of the new tokens (the queries and their own keys)
    cache_positions: ``[B, S]`` positions of the cache slots (unused without a cache)
    """

    size: jax.Array
    positions: jax.Array
    cache_positions: jax.Array


def block_size(length: int, preferred: int) -> int:
    """``preferred``, or ``length`` itself when it fits in one block."""
    return min(length, preferred)


def block_start(index, block: int, length: int):
    """Where block ``index`` of ``block`` slots is read in ``length`` slots: the last, ragged one ends at ``length``."""
    return jnp.minimum(index * block, length - block)


def slice_reader(keys, values) -> ReadBlock:
    """A :data:`ReadBlock` over ``keys, values [B, Hkv, S, D]``."""
    return lambda start, size: tuple(jax.lax.dynamic_slice_in_dim(a, start, size, axis=2) for a in (keys, values))


def cache_source(read: ReadBlock, capacity: int, starts) -> KeySource:
    """The cached slots: row ``b`` sees its slots ``< starts [B]`` from every query."""
    visible = lambda _, slots: (slots[None, :] < starts[:, None])[:, None, :]  # [B, 1, Tk]
    return KeySource(read, capacity, visible, jnp.max(starts))


def recompute_source(read: ReadBlock, capacity: int, lengths, key_positions, excluded, query_positions) -> KeySource:
    """Cached slots seen by queries at any positions: row ``b``'s slot ``s`` is visible to query ``t`` when
    ``s < lengths[b]``, ``s`` is not ``excluded[b, s]`` (its keys are being recomputed) and
    ``key_positions[b, s] <= query_positions[b, t]``.

    ``lengths [B]``; ``key_positions, excluded [B, S]``; ``query_positions [B, T]``.
    """

    def visible(queries, slots):
        qp = jnp.take(query_positions, queries, axis=1)  # [B, Tq]
        kp = jnp.take(key_positions, slots, axis=1)  # [B, Tk]
        keep = (slots[None, :] < lengths[:, None]) & ~jnp.take(excluded, slots, axis=1)  # [B, Tk]
        return keep[:, None, :] & (kp[:, None, :] <= qp[:, :, None])  # [B, Tq, Tk]

    return KeySource(read, capacity, visible, jnp.max(lengths))


def _new_source(keys, values, num_new) -> KeySource:
    """The new tokens' own keys: query ``t`` sees keys ``0 .. t``, the same in every row."""
    visible = lambda positions, slots: (slots[None, :] <= positions[:, None])[None]  # [1, Tq, Tk]
    return KeySource(slice_reader(keys, values), keys.shape[2], visible, jnp.max(num_new))


def _windowed(source: KeySource, size, query_positions, key_positions) -> KeySource:
    """``source`` seen through a sliding window: slot ``s`` of row ``b`` is also hidden from query ``t``
    unless ``query_positions[b, t] - key_positions[b, s] < size``.

    ``query_positions [B, T]``, ``key_positions [B, S]``, ``size`` int32 scalar.
    """

    def visible(queries, slots):
        qp = jnp.take(query_positions, queries, axis=1)  # [B, Tq]
        kp = jnp.take(key_positions, slots, axis=1)  # [B, Tk]
        return source.visible(queries, slots) & (qp[:, :, None] - kp[:, None, :] < size)  # [B, Tq, Tk]

    return source._replace(visible=visible)


def _key_block_step(q, mask, keys, values, carry, logit_cap):
    """One online-softmax update of ``carry = (max [B, H, G, Tq], sum [B, H, G, Tq], acc [B, H, G, Tq, D])``.

    ``q [B, H, G, Tq, D]`` scaled float32 queries; ``keys, values [B, H, Tk, D]``;
    ``mask`` broadcasts to ``[B, 1, 1, Tq, Tk]``; ``logit_cap`` None or the soft cap of the scores.
    """
    m, l, acc = carry
    scores = jnp.einsum("bhgtd,bhsd->bhgts", q, keys.astype(jnp.float32))  # [B, H, G, Tq, Tk]
    if logit_cap is not None:
        scores = logit_cap * jnp.tanh(scores / logit_cap)
    scores = jnp.where(mask, scores, -jnp.inf)
    m_new = jnp.maximum(m, scores.max(axis=-1))  # [B, H, G, Tq], finite: m starts at _NO_MAX
    p = jnp.exp(scores - m_new[..., None])  # [B, H, G, Tq, Tk], 0 where masked
    alpha = jnp.exp(m - m_new)  # [B, H, G, Tq]
    l = alpha * l + p.sum(axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("bhgts,bhsd->bhgtd", p, values.astype(jnp.float32))
    return m_new, l, acc


def _attend(q, positions, source: KeySource, end, carry, logit_cap):
    """Fold the key blocks of ``source`` that hold slots ``< end`` into ``carry`` (see :func:`_key_block_step`).

    ``q [B, H, G, Tq, D]`` at query indices ``positions [Tq]``; ``end`` traced int32.
    """
    k_block = block_size(source.length, DECODE_K_BLOCK if q.shape[3] <= SMALL_QUERY_BLOCK else K_BLOCK)

    def step(j, carry):
        read_at = block_start(j, k_block, source.length)
        keys, values = source.read(read_at, k_block)  # [B, H, Tk, D]
        slots = read_at + jnp.arange(k_block)  # [Tk]
        mask = source.visible(positions, slots) & (slots >= j * k_block)  # not in an earlier block
        return _key_block_step(q, mask[:, None, None], keys, values, carry, logit_cap)  # [B or 1, 1, 1, Tq or 1, Tk]

    if k_block == source.length:  # one block: masks alone give the right answer, no loop needed
        return step(0, carry)
    return jax.lax.fori_loop(0, (end + k_block - 1) // k_block, step, carry)


def _query_block(q, start, new: KeySource, cached: KeySource | None, logit_cap):
    """Attention of the query block ``q [B, H, G, Tq, D]`` (float32, scaled) at query indices ``start ..``.

    Returns float32 ``[B, H, G, Tq, D]``.
    """
    stats = jnp.full(q.shape[:-1], _NO_MAX, jnp.float32)  # [B, H, G, Tq]
    carry = (stats, jnp.zeros_like(stats), jnp.zeros_like(q))
    positions = start + jnp.arange(q.shape[3])  # [Tq]
    if cached is not None:
        carry = _attend(q, positions, cached, cached.end, carry, logit_cap)
    _, l, acc = _attend(q, positions, new, jnp.minimum(start + q.shape[3], new.end), carry, logit_cap)  # to the diagonal
    return acc / jnp.where(l > 0, l, 1.0)[..., None]  # a query that sees no key (padding only) gives 0


def blocked_attention(
    q,
    keys,
    values,
    num_new,
    cached: KeySource | None = None,
    *,
    scale: float | None = None,
    logit_cap: float | None = None,
    window: SlidingWindow | None = None,
):
    """Causal attention of ``T`` new tokens over an optional cache (see the module docstring).

    Args:
      q: queries ``[B, Hkv, G, T, D]``, grouped by KV head, any float dtype.
      keys, values: the new tokens' own ``[B, Hkv, T, D]``.
      num_new: int32 ``[B]`` valid new tokens per row (the rest is padding).
      cached: the cache slots before the new tokens (:func:`cache_source`); None for a
        fresh prefill.
      scale: the factor on the scores; None means ``1/sqrt(D)``.
      logit_cap: None, or ``c``: scores ``s`` become ``c * tanh(s / c)``.
      window: None, or a sliding window hiding keys (new and cached) by position.

    Returns:
      float32 ``[B, Hkv, G, T, D]``; padding-only query blocks are 0.
    """
    T, D = q.shape[3], q.shape[4]
    q = q.astype(jnp.float32) * (1.0 / math.sqrt(D) if scale is None else scale)  # [B, Hkv, G, T, D]
    new = _new_source(keys, values, num_new)
    if window is not None:
        new = _windowed(new, window.size, window.positions, window.positions)
        if cached is not None:
            cached = _windowed(cached, window.size, window.positions, window.cache_positions)
    q_block = block_size(T, Q_BLOCK)
    if q_block == T:
        return _query_block(q, 0, new, cached, logit_cap)

    def one_block(i, out):
        start = block_start(i, q_block, T)
        qb = jax.lax.dynamic_slice_in_dim(q, start, q_block, axis=3)  # [B, Hkv, G, Tq, D]
        block = _query_block(qb, start, new, cached, logit_cap)
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=3)

    return jax.lax.fori_loop(0, (new.end + q_block - 1) // q_block, one_block, jnp.zeros_like(q))
