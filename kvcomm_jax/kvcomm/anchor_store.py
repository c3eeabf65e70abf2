"""The anchor pools of one engine, one per placeholder (docs/design.md §5 and §8).

The store creates, grows and places each placeholder's
:class:`~kvcomm_jax.kvcomm.anchor_pool.AnchorPool`, runs anchor prediction on new
contents, inserts anchors and records consumers' deltas, and hands a consumer the
anchor inputs for one content. Every pool it holds is laid out on its mesh; its
bookkeeping is a host :class:`~kvcomm_jax.kvcomm.slot_book.SlotBook`, so no decision reads a
device array back (only anchor prediction's results come back, once per step).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kvcomm_jax.kvcomm.anchor_pool import (
    AnchorPool,
    add_activations,
    check_pool_shapes,
    empty_pool,
    ensure_token_capacity,
    insert_anchor,
    record_deltas,
)
from kvcomm_jax.kvcomm.matching import predict
from kvcomm_jax.kvcomm.request import Content
from kvcomm_jax.kvcomm.reuse import AnchorInputs
from kvcomm_jax.kvcomm.segments import SegmentKV
from kvcomm_jax.kvcomm.slot_book import SlotBook
from kvcomm_jax.kvcomm.templates import placeholder_producer
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.scale import sharding
from kvcomm_jax.scale.distributed import host_values


def _anchor_reason(held: np.ndarray, lengths: np.ndarray, length: int) -> str:
    """Why a content was predicted to be a new anchor, from the pool it was predicted against."""
    if held.sum() < 2:
        return "fewer than two anchors held"
    if (held & (lengths >= length)).sum() < 2:
        return f"fewer than two anchors of {length}+ tokens"
    return "entropy gate"


class AnchorStore:
    """Placeholder name -> :class:`AnchorPool`, with the pool lifecycle.

    Args:
      config: the model's config (KV shape and dtype of the anchors).
      capacity: V, anchors per placeholder; window: W, the oldest anchors considered for eviction.
      gamma: entropy threshold of anchor prediction.
      mesh: where the pools live (see :mod:`kvcomm_jax.scale.sharding`).
      coverage: anchors shorter than a content may serve the tokens they cover (the paper's
        length gate asks every anchor to be at least as long as the content).
    """

    def __init__(self, config: ModelConfig, *, capacity: int, window: int, gamma: float, mesh: Mesh, coverage: bool = False):
        self.config = config
        self.capacity, self.window, self.gamma, self.mesh, self.coverage = capacity, window, gamma, mesh, coverage
        self.pools: dict[str, AnchorPool] = {}
        self.books: dict[str, SlotBook] = {}  # the host bookkeeping of each pool
        self.evictions: dict[str, int] = {}  # anchors replaced by a new one, per placeholder

    def _set(self, name: str, pool: AnchorPool) -> AnchorPool:
        self.pools[name] = sharding.place(pool, self.mesh)  # growth changes shapes: lay out again
        return self.pools[name]

    def pool(self, name: str, length: int) -> AnchorPool:
        """The pool of ``name``, created or with its token axis grown to hold ``length`` tokens.

        The slot axis starts at two and doubles as anchors arrive, up to ``capacity``: memory
        and the correction's work follow the anchors held (every slot is read, usable or
        not; all V slots of every pool at once would hold about 12 GB at the paper's
        5-agent, 1024-token setting on the default model), at the price of one new program
        per growth (at most ``log2(capacity)`` in a pool's life). The token axis is the bucket
        of the longest content seen. A full pool, and a content no longer than every earlier
        one, change no shape.
        """
        c = self.config
        if name not in self.pools:
            tokens = bucket_length(length, what=f"placeholder {{{name}}} content")
            slots = min(2, self.capacity)
            pool = empty_pool(self.capacity, c.num_layers, c.num_kv_heads, c.head_dim, tokens, c.jnp_dtype, slots=slots)
            self.books[name] = SlotBook.empty(slots)
            return self._set(name, pool)
        if length > self.pools[name].token_capacity:
            return self._set(name, ensure_token_capacity(self.pools[name], length))
        return self.pools[name]

    def token_capacity(self, name: str) -> int:
        """Tokens ``name``'s pool holds per anchor (0 before its first content): the width its contents are corrected at."""
        pool = self.pools.get(name)
        return 0 if pool is None else pool.token_capacity

    def observe(self, name: str, contents: Sequence[Content]) -> None:
        """Anchor prediction for contents whose base KV is known: sets each ``content.becomes_anchor``.

        Every prediction of one call sees the pool as it was before it (the contents of one
        batched step are predicted together, with one read back of the results); then each
        shareable content, in order, adds activations to the anchors it matched.
        """
        pool = self.pool(name, max(len(c.ids) for c in contents))
        predictions = host_values([
            predict(c.base.values, c.base.length, pool.values, pool.lengths, pool.valid, self.gamma, self.coverage)[:2]
            for c in contents
        ])
        book = self.books[name]
        held, lengths = book.valid, book.lengths  # [V]; activations below change neither
        for content, (becomes_anchor, increments) in zip(contents, predictions):
            content.becomes_anchor = bool(becomes_anchor)
            length = 1 if self.coverage else len(content.ids)
            content.anchor_reason = _anchor_reason(held, lengths, length) if becomes_anchor else None
            if not content.becomes_anchor:
                pool = add_activations(pool, book, increments)
        self._set(name, pool)

    def unusable_reason(self, name: str, consumer: int, length: int) -> str | None:
        """Why no anchor of ``name`` may correct a ``length``-token content for ``consumer``; None when one may."""
        if self.usable(name, consumer, length).any():
            return None
        book = self.books.get(name)
        if book is None or not book.holds_deltas(consumer):
            return f"{{{name}}}: no anchor holds agent {consumer}'s deltas"
        return f"{{{name}}}: no anchor with agent {consumer}'s deltas is {length} tokens long"

    def usable(self, name: str, consumer: int, length: int) -> np.ndarray:
        """``[V]`` bool: anchors of ``name`` that may correct a ``length``-token content for ``consumer``."""
        if name not in self.books:
            return np.zeros(0, bool)
        return self.books[name].usable_for(consumer, 1 if self.coverage else length)

    def covered(self, name: str, consumer: int, length: int) -> int:
        """Leading tokens of a ``length``-token content that some usable anchor covers (all of them without coverage)."""
        usable = self.usable(name, consumer, length)
        return min(length, int(self.books[name].lengths[usable].max(initial=0)))

    def store(self, name: str, content: Content, consumer: int, placeholder_delta: SegmentKV, prefix_delta: SegmentKV) -> None:
        """Record ``consumer``'s deviations for ``content``, inserting the content as an anchor first if it is new."""
        length = len(content.ids)
        pool, book = self.pool(name, length), self.books[name]
        if content.slot is None:
            if pool.slots == self.capacity and book.valid.all():
                self.evictions[name] = self.evictions.get(name, 0) + 1
            pool, content.slot = insert_anchor(pool, book, content.base.keys, content.base.values, length, self.window)
            pool = self._set(name, pool)
        pool = record_deltas(
            pool, book, content.slot, consumer,
            placeholder_delta.keys, placeholder_delta.values, prefix_delta.keys, prefix_delta.values,
        )
        self._set(name, pool)

    def inputs_for(self, name: str, consumer: int, contents: Sequence[Content], prefix_tokens: int) -> AnchorInputs:
        """The anchors of ``name`` as ``consumer`` uses them to correct ``contents`` (one row each: ``usable [B, V]``).

        ``prefix_tokens``: the bucket of the consumer's prefix segment after the placeholder.
        Without a pool, or without this consumer's deltas, one empty slot that no row may use
        (the correction then changes nothing).
        """
        pool = self.pools.get(name)
        if pool is None or str(consumer) not in pool.consumers:
            c = self.config
            pool = empty_pool(1, c.num_layers, c.num_kv_heads, c.head_dim, 1, c.jnp_dtype)
            zeros = functools.partial(jnp.zeros, dtype=pool.keys.dtype)
            prefix = zeros((c.num_layers, c.num_kv_heads, prefix_tokens, c.head_dim))  # [L, H, Tp, D]
            empty = zeros(pool.keys.shape[1:])
            pool = record_deltas(pool, SlotBook.empty(1), 0, consumer, empty, empty, prefix, prefix)
            usable = np.zeros((len(contents), 1), bool)
        else:
            usable = np.stack([self.usable(name, consumer, len(c.ids)) for c in contents])  # [B, V]
        return AnchorInputs(
            keys=pool.keys, values=pool.values, lengths=pool.lengths,
            usable=sharding.place(usable, self.mesh),
            deltas=pool.consumers[str(consumer)],
        )

    def stats(self) -> dict:
        """Per placeholder: anchors held, hits (activations) per held anchor, evictions, slots and bytes allocated."""
        out = {}
        for name, pool in self.pools.items():
            book = self.books[name]
            out[name] = {
                "anchors": int(book.valid.sum()),
                "hits": book.activations[book.valid].tolist(),
                "evictions": self.evictions.get(name, 0),
                "slots": pool.slots,
                "bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(pool)),
            }
        return out

    def replace_all(self, pools: dict[str, AnchorPool]) -> None:
        """Replace every pool (e.g. restored from a checkpoint), checking they fit the model."""
        c = self.config
        for name, pool in pools.items():
            placeholder_producer(name)  # raises on unknown placeholder names
            check_pool_shapes(pool, c.num_layers, c.num_kv_heads, c.head_dim, name)
            if pool.keys.dtype != c.jnp_dtype:
                raise ValueError(f"anchor pool {name!r} has dtype {pool.keys.dtype}, the model uses {c.dtype}")
        self.pools, self.books = {}, {}
        for name, pool in pools.items():
            self.books[name] = SlotBook.read(pool)
            self._set(name, pool)
