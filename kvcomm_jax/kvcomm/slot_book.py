"""The host-side bookkeeping of one anchor pool: which slots hold what, read without a device round trip.

Every decision the engine takes about a pool (which anchors may correct a content, where a
new anchor goes, which one is evicted, why nothing was usable, pool statistics) reads this
book, a handful of ``[V]`` numpy arrays on the host. The pool's device arrays of the same
names are written *from* the book (:func:`kvcomm_jax.kvcomm.anchor_pool.publish`) for the
jitted matching and the checkpoints, never read back in a call: the only read back is
:meth:`SlotBook.read`, once, when a pool is restored.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SlotBook:
    """``[V]`` bookkeeping of a pool with ``V`` allocated slots.

    lengths:     ``[V]`` int32 content length of each anchor
    valid:       ``[V]`` bool, slot occupied
    activations: ``[V]`` int32, times prediction selected the anchor
    ages:        ``[V]`` int32 insertion stamp (larger is newer)
    next_age:    the next insertion stamp
    present:     consumer key -> ``[V]`` bool, the slot holds that consumer's deltas
    """

    lengths: np.ndarray
    valid: np.ndarray
    activations: np.ndarray
    ages: np.ndarray
    next_age: int = 0
    present: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, slots: int) -> "SlotBook":
        zeros = np.zeros(slots, np.int32)
        return cls(zeros.copy(), np.zeros(slots, bool), zeros.copy(), zeros.copy())

    @classmethod
    def read(cls, pool) -> "SlotBook":
        """The book of a pool whose device bookkeeping is the truth (a restored checkpoint): one read back."""
        return cls(
            lengths=np.array(pool.lengths, np.int32), valid=np.array(pool.valid, bool),
            activations=np.array(pool.activations, np.int32), ages=np.array(pool.ages, np.int32),
            next_age=int(pool.next_age), present={k: np.array(c.present, bool) for k, c in pool.consumers.items()},
        )

    @property
    def slots(self) -> int:
        return self.valid.shape[0]

    def grow(self, slots: int) -> None:
        """Allocate up to ``slots`` slots; new slots are empty."""

        def pad(x):
            return np.pad(x, (0, slots - x.shape[0]))

        self.lengths, self.valid = pad(self.lengths), pad(self.valid)
        self.activations, self.ages = pad(self.activations), pad(self.ages)
        self.present = {k: pad(p) for k, p in self.present.items()}

    def choose_slot(self, window: int, capacity: int) -> int:
        """The slot a new anchor goes to: the first free one (``slots`` means "grow first"), else evict
        among the ``window`` oldest the least activated; ties on activation go to the oldest."""
        free = np.flatnonzero(~self.valid)
        if free.size:
            return int(free[0])
        if self.slots < capacity:
            return self.slots
        oldest = np.argsort(self.ages, kind="stable")[: max(1, window)]
        # lexsort: last key is primary -> lowest activation, then oldest
        return int(oldest[np.lexsort((self.ages[oldest], self.activations[oldest]))[0]])

    def insert(self, slot: int, length: int) -> None:
        """A new anchor of ``length`` tokens in ``slot``: no activations yet, every consumer's deltas there dropped."""
        self.lengths[slot], self.valid[slot], self.activations[slot] = length, True, 0
        self.ages[slot], self.next_age = self.next_age, self.next_age + 1
        for present in self.present.values():
            present[slot] = False

    def mark_deltas(self, consumer: int, slot: int) -> None:
        """``consumer``'s deltas for the anchor in ``slot`` are recorded."""
        self.present.setdefault(str(consumer), np.zeros(self.slots, bool))[slot] = True

    def activate(self, increments) -> None:
        """Activation counts += ``increments [V]``."""
        self.activations = self.activations + np.asarray(increments, np.int32)

    def usable_for(self, consumer: int, length: int) -> np.ndarray:
        """``[V]`` bool: anchors that may correct a content of ``length`` tokens for ``consumer``."""
        present = self.present.get(str(consumer))
        if present is None:
            return np.zeros(self.slots, bool)
        return self.valid & present & (self.lengths >= length)

    def holds_deltas(self, consumer: int) -> bool:
        """Some held anchor carries ``consumer``'s deltas."""
        present = self.present.get(str(consumer))
        return present is not None and bool(np.any(self.valid & present))
