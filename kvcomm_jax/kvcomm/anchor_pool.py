"""The anchor pool of one placeholder, as a pytree, and pure functions over it.

An anchor is one observed content of the placeholder: its base keys (frame 0,
i.e. de-rotated to position 0) and values over the content, and for every
consuming agent that has observed it, the deviations ``real - base`` over the
content and over that agent's prefix segment right after the placeholder.
Activation counts and ages live in the same pytree, written from the host's
:class:`~kvcomm_jax.kvcomm.slot_book.SlotBook` (the truth every decision reads) and never
read back during a call. At most ``capacity`` (V)
anchors are ever held; the slot axis starts small and doubles (up to V) as
anchors arrive, so a young pool costs little memory and matching work, and the
token axis is padded to a bucket that grows when a longer content arrives.
Occupied slots always form a prefix: new anchors take the first free slot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvcomm_jax.kvcomm.segments import fit_tokens
from kvcomm_jax.kvcomm.slot_book import SlotBook
from kvcomm_jax.model.buckets import bucket_length

ANCHOR_AXES = ("anchors", "layers", "kv_heads", "tokens", "head_dim")  # [V, L, H, T, D] stacks
SLOT_AXES = ("anchor_slots",)  # [V] bookkeeping, replicated: written from the host's SlotBook


@struct.dataclass
class ConsumerDeltas:
    """One consuming agent's deviations for every anchor slot.

    placeholder_keys, placeholder_values: ``[V, L, H, T, D]`` (keys in frame 0)
    prefix_keys, prefix_values:           ``[V, L, H, Tp, D]`` over the consumer's prefix segment
    present:                              ``[V]`` bool, slot holds this consumer's deltas
    """

    logical_axes = {  # see kvcomm_jax.scale.sharding
        "placeholder_keys": ANCHOR_AXES,
        "placeholder_values": ANCHOR_AXES,
        "prefix_keys": ANCHOR_AXES,
        "prefix_values": ANCHOR_AXES,
        "present": SLOT_AXES,
    }

    placeholder_keys: jax.Array
    placeholder_values: jax.Array
    prefix_keys: jax.Array
    prefix_values: jax.Array
    present: jax.Array


@struct.dataclass
class AnchorPool:
    """Anchors of one placeholder (``V`` = allocated slots, at most ``capacity``).

    keys, values: ``[V, L, H, T, D]`` base KV of each anchor's content (keys in frame 0)
    lengths:      ``[V]`` int32 content length of each anchor
    valid:        ``[V]`` bool, slot occupied
    activations:  ``[V]`` int32, times prediction selected the anchor
    ages:         ``[V]`` int32 insertion stamp (larger is newer)
    next_age:     int32 scalar, the next insertion stamp
    consumers:    agent id (as a string key) -> :class:`ConsumerDeltas`
    """

    logical_axes = {  # see kvcomm_jax.scale.sharding
        "keys": ANCHOR_AXES,
        "values": ANCHOR_AXES,
        "lengths": SLOT_AXES,
        "valid": SLOT_AXES,
        "activations": SLOT_AXES,
        "ages": SLOT_AXES,
    }

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    valid: jax.Array
    activations: jax.Array
    ages: jax.Array
    next_age: jax.Array
    consumers: dict
    capacity: int = struct.field(pytree_node=False)

    @property
    def slots(self) -> int:
        """Allocated slots (grows up to ``capacity``)."""
        return self.keys.shape[0]

    @property
    def token_capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """``(L, H, D)`` of the model the pool was built with."""
        return self.keys.shape[1], self.keys.shape[2], self.keys.shape[4]


def empty_pool(
    capacity: int, num_layers: int, num_kv_heads: int, head_dim: int, tokens: int, dtype, slots: int | None = None
) -> AnchorPool:
    """A pool of at most ``capacity`` anchors with ``slots`` (default: all) allocated, ``tokens`` long."""
    if capacity < 1:
        raise ValueError(f"anchor capacity must be >= 1, got {capacity}")
    slots = capacity if slots is None else slots
    if not 1 <= slots <= capacity:
        raise ValueError(f"allocated slots must be in [1, {capacity}], got {slots}")
    shape = (slots, num_layers, num_kv_heads, tokens, head_dim)
    return AnchorPool(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((slots,), jnp.int32),
        valid=jnp.zeros((slots,), bool),
        activations=jnp.zeros((slots,), jnp.int32),
        ages=jnp.zeros((slots,), jnp.int32),
        next_age=jnp.zeros((), jnp.int32),
        consumers={},
        capacity=capacity,
    )


def grow_slots(pool: AnchorPool) -> AnchorPool:
    """The same pool with twice the allocated slots (at most ``capacity``); new slots are empty."""
    slots = min(2 * pool.slots, pool.capacity)

    def pad(x):  # every array but next_age has the slot axis first
        return jnp.pad(x, [(0, slots - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

    return pool.replace(
        keys=pad(pool.keys), values=pad(pool.values), lengths=pad(pool.lengths), valid=pad(pool.valid),
        activations=pad(pool.activations), ages=pad(pool.ages),
        consumers={k: jax.tree.map(pad, c) for k, c in pool.consumers.items()},
    )


def ensure_token_capacity(pool: AnchorPool, length: int) -> AnchorPool:
    """The same pool, its token axis re-padded to the bucket of ``length`` if it is shorter."""
    if length <= pool.token_capacity:
        return pool
    tokens = bucket_length(length, what="placeholder content")
    consumers = {
        k: c.replace(placeholder_keys=fit_tokens(c.placeholder_keys, tokens), placeholder_values=fit_tokens(c.placeholder_values, tokens))
        for k, c in pool.consumers.items()
    }
    return pool.replace(keys=fit_tokens(pool.keys, tokens), values=fit_tokens(pool.values, tokens), consumers=consumers)


def publish(pool: AnchorPool, book: SlotBook) -> AnchorPool:
    """``pool`` with its ``[V]`` bookkeeping (and every consumer's ``present``) written from ``book``."""
    return pool.replace(
        lengths=jnp.asarray(book.lengths), valid=jnp.asarray(book.valid), activations=jnp.asarray(book.activations),
        ages=jnp.asarray(book.ages), next_age=jnp.asarray(book.next_age, jnp.int32),
        consumers={k: c.replace(present=jnp.asarray(book.present[k])) for k, c in pool.consumers.items()},
    )


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_base(keys, values, slot, keys0, new_values):
    """keys, values ``[V, L, H, T, D]`` with slot ``slot`` set to a content's ``[L, H, Tb, D]`` base KV."""
    T = keys.shape[3]
    keys0, new_values = fit_tokens(keys0, T), fit_tokens(new_values, T)  # [L, H, T, D]
    return keys.at[slot].set(keys0.astype(keys.dtype)), values.at[slot].set(new_values.astype(values.dtype))


def insert_anchor(pool: AnchorPool, book: SlotBook, keys0, values, length: int, window: int) -> tuple[AnchorPool, int]:
    """Store a content's base KV (``[L, H, Tb, D]``, ``length`` valid tokens) as a new anchor.

    The slot comes from ``book`` (updated in place): the first free one, growing the pool
    when none is, else an eviction (see :meth:`SlotBook.choose_slot`); the evicted slot's
    consumer deltas are dropped. Returns the new pool and the slot used. The input pool's
    KV is donated.
    """
    pool = ensure_token_capacity(pool, length)
    slot = book.choose_slot(window, pool.capacity)
    if slot == pool.slots:
        pool = grow_slots(pool)
        book.grow(pool.slots)
    book.insert(slot, length)
    keys, new_values = _write_base(pool.keys, pool.values, jnp.int32(slot), keys0, values)
    return publish(pool.replace(keys=keys, values=new_values), book), slot


def _empty_consumer(pool: AnchorPool, prefix_tokens: int) -> ConsumerDeltas:
    V, L, H, T, D = pool.keys.shape

    def zeros(tokens):  # a fresh buffer each: the arrays are donated separately
        return jnp.zeros((V, L, H, tokens, D), pool.keys.dtype)

    return ConsumerDeltas(zeros(T), zeros(T), zeros(prefix_tokens), zeros(prefix_tokens), jnp.zeros((V,), bool))


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_deltas(deltas: ConsumerDeltas, slot, ph_keys, ph_values, pf_keys, pf_values) -> ConsumerDeltas:
    """``deltas`` with slot ``slot`` set (``present`` is left to :func:`publish`)."""
    T = deltas.placeholder_keys.shape[3]
    fit = functools.partial(fit_tokens, tokens=T)  # [L, H, Tb, D] -> [L, H, T, D]

    return ConsumerDeltas(
        placeholder_keys=deltas.placeholder_keys.at[slot].set(fit(ph_keys).astype(deltas.placeholder_keys.dtype)),
        placeholder_values=deltas.placeholder_values.at[slot].set(fit(ph_values).astype(deltas.placeholder_values.dtype)),
        prefix_keys=deltas.prefix_keys.at[slot].set(pf_keys.astype(deltas.prefix_keys.dtype)),
        prefix_values=deltas.prefix_values.at[slot].set(pf_values.astype(deltas.prefix_values.dtype)),
        present=deltas.present,
    )


def record_deltas(
    pool: AnchorPool, book: SlotBook, slot: int, consumer: int, ph_keys, ph_values, pf_keys, pf_values
) -> AnchorPool:
    """Store ``consumer``'s deviations for the anchor in ``slot`` (marked in ``book``, updated in place).

    ph_*: ``[L, H, Tb, D]`` over the content (zero beyond its length); pf_*:
    ``[L, H, Tp, D]`` over the consumer's prefix segment (Tp fixed per consumer).
    """
    key = str(consumer)
    deltas = pool.consumers.get(key)
    if deltas is None:
        deltas = _empty_consumer(pool, pf_keys.shape[2])
    elif deltas.prefix_keys.shape[3] != pf_keys.shape[2]:
        raise ValueError(
            f"consumer {consumer}: prefix deltas have {pf_keys.shape[2]} tokens, the pool holds {deltas.prefix_keys.shape[3]}"
        )
    consumers = dict(pool.consumers)
    consumers[key] = _write_deltas(deltas, jnp.int32(slot), ph_keys, ph_values, pf_keys, pf_values)
    book.mark_deltas(consumer, slot)
    return publish(pool.replace(consumers=consumers), book)


def add_activations(pool: AnchorPool, book: SlotBook, increments) -> AnchorPool:
    """Activation counts += ``increments [V]`` (in ``book``, updated in place, and on the device)."""
    book.activate(increments)
    return publish(pool, book)


def check_pool_shapes(pool: AnchorPool, num_layers: int, num_kv_heads: int, head_dim: int, name: str = "pool") -> None:
    """Raise ValueError if ``pool`` was built for another model's KV shape."""
    expected = (num_layers, num_kv_heads, head_dim)
    if tuple(pool.kv_shape) != expected:
        raise ValueError(
            f"anchor pool {name!r} has KV shape (L, H, D) = {tuple(pool.kv_shape)}, but the model has {expected}"
        )
