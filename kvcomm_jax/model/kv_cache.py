"""The KV cache pytree and span helpers.

A cache has a fixed capacity ``S`` (chosen from length buckets, so a new
prompt length inside a bucket reuses the compiled program). Slots ``[0,
lengths[b])`` of row ``b`` are valid; ``positions`` records the RoPE position
each slot's key was rotated to, so segments assembled from different contexts
keep their own positions.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from kvcomm_jax.model.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys/values of every layer.

    keys, values: ``[L, B, H, S, D]`` (H = KV heads, S = capacity)
    positions:    ``[B, S]`` int32 RoPE position of each slot
    lengths:      ``[B]`` int32 number of valid slots per row
    """

    logical_axes = {  # see kvcomm_jax.scale.sharding
        "keys": ("layers", "batch", "kv_heads", "tokens", "head_dim"),
        "values": ("layers", "batch", "kv_heads", "tokens", "head_dim"),
        "positions": ("batch", "tokens"),
        "lengths": ("batch",),
    }

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache: ``[L, batch, H_kv, capacity, D]`` zeros, all lengths 0."""
    dtype = config.jnp_dtype if dtype is None else dtype
    shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        positions=jnp.zeros((batch, capacity), jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def slice_span(cache: KVCache, row: int, start, length: int):
    """Keys, values ``[L, H, length, D]`` and positions ``[length]`` of slots ``[start, start+length)`` of one row.

    ``length`` is static; ``start`` may be traced.
    """
    keys = jax.lax.dynamic_slice_in_dim(cache.keys[:, row], start, length, axis=2)  # [L, H, length, D]
    values = jax.lax.dynamic_slice_in_dim(cache.values[:, row], start, length, axis=2)
    positions = jax.lax.dynamic_slice_in_dim(cache.positions[row], start, length, axis=0)
    return keys, values, positions


def write_span(cache: KVCache, row: int, start, keys, values, positions) -> KVCache:
    """Write ``keys, values [L, H, T, D]`` and ``positions [T]`` into slots ``[start, start+T)`` of one row.

    Lengths are left alone; set them with :func:`with_lengths` once assembly is done.
    """
    new_keys = cache.keys.at[:, row].set(
        jax.lax.dynamic_update_slice_in_dim(cache.keys[:, row], keys.astype(cache.keys.dtype), start, axis=2)
    )
    new_values = cache.values.at[:, row].set(
        jax.lax.dynamic_update_slice_in_dim(cache.values[:, row], values.astype(cache.values.dtype), start, axis=2)
    )
    new_positions = cache.positions.at[row].set(
        jax.lax.dynamic_update_slice_in_dim(cache.positions[row], positions.astype(jnp.int32), start, axis=0)
    )
    return cache.replace(keys=new_keys, values=new_values, positions=new_positions)


def with_lengths(cache: KVCache, lengths) -> KVCache:
    """The same cache with ``lengths [B]`` replaced."""
    return cache.replace(lengths=jnp.asarray(lengths, jnp.int32).reshape(cache.lengths.shape))


def concat_rows(caches: Sequence[KVCache]) -> KVCache:
    """Caches of equal capacity stacked along the batch axis (rows in the given order)."""
    if len(caches) == 1:
        return caches[0]
    return KVCache(
        keys=jnp.concatenate([c.keys for c in caches], axis=1),  # [L, B, H, S, D]
        values=jnp.concatenate([c.values for c in caches], axis=1),
        positions=jnp.concatenate([c.positions for c in caches], axis=0),  # [B, S]
        lengths=jnp.concatenate([c.lengths for c in caches], axis=0),  # [B]
    )


def take_rows(cache: KVCache, rows) -> KVCache:
    """The rows ``rows [R]`` of ``cache`` (any order), as a cache of batch ``R``."""
    return KVCache(
        keys=jnp.take(cache.keys, rows, axis=1),  # [L, R, H, S, D]
        values=jnp.take(cache.values, rows, axis=1),
        positions=jnp.take(cache.positions, rows, axis=0),  # [R, S]
        lengths=jnp.take(cache.lengths, rows, axis=0),  # [R]
    )
