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
    partial_reuse: reuse up to the first placeholder that cannot be reused and recompute the
      rest in the same forward (False: the paper's all-or-nothing decision, a dense prefill)
    exact_question: compute the question in context when it directly follows prefix 0,
      instead of approximating it (its anchor gate then no longer decides the call)
    anchor_coverage: anchors shorter than a content serve the tokens they cover, and the
      tokens none covers are computed in context (False: the paper's length gate, every
      anchor at least as long as the content)
    recompute_ratio: the fraction of approximated tokens a reuse call also recomputes, chosen
      by the strategy's selection rule; None is the strategy's default (0, or CacheBlend's 0.15)
    strict_segments: a question or condition whose text merges with the template text around
      its placeholder into a token (so the prompt's segment-wise ids are not its own
      tokenization) raises :class:`~kvcomm_jax.kvcomm.templates.SegmentBoundaryError`; False:
      a warning per placeholder and a count in ``KVCommEngine.boundary_mismatches`` (dense
      and reuse calls see the same segment-wise ids either way)
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
    partial_reuse: bool = True
    exact_question: bool = False
    anchor_coverage: bool = False
    recompute_ratio: float | None = None
    strict_segments: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r} (known: {', '.join(IMPLS)})")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.anchor_capacity < 1 or self.eviction_window < 1:
            raise ValueError("anchor_capacity and eviction_window must be >= 1")
        if self.recompute_ratio is not None and not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
