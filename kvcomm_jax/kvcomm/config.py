"""Engine settings."""

from __future__ import annotations

import dataclasses

from kvcomm_jax.model.sampling import SamplingConfig
from pallas_kernels import IMPLS

DEFAULT_ANCHOR_CAPACITY = 20
DEFAULT_EVICTION_WINDOW = 5


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    mode: the reuse strategy, a key of ``kvcomm_jax.kvcomm.strategies.STRATEGIES`` (checked by the engine)
    gamma: entropy threshold of anchor prediction (reuse more as it grows)
    anchor_capacity: V, anchors per placeholder; eviction_window: W oldest considered for eviction
    lead_in: short context placed before a question/condition when computing its base KV
    impl: kernel implementation, one of ``pallas_kernels.IMPLS``
    ignore_eos: decode exactly ``max_new_tokens`` tokens (fixed-length workloads)
    """

    mode: str = "kvcomm"
    gamma: float = 0.3
    anchor_capacity: int = DEFAULT_ANCHOR_CAPACITY
    eviction_window: int = DEFAULT_EVICTION_WINDOW
    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    lead_in: str = "The task is:\n\n"
    impl: str = "auto"
    ignore_eos: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r} (known: {', '.join(IMPLS)})")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.anchor_capacity < 1 or self.eviction_window < 1:
            raise ValueError("anchor_capacity and eviction_window must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
