"""Rotate-half rotary position embeddings (RoPE), with optional Llama-3 frequency scaling.

A vector rotated to position ``a`` and then by ``b`` equals the vector rotated
to ``a + b`` (``R(a) R(b) = R(a + b)``); the KVCOMM engine relies on this to
move cached keys between positions.
"""

from __future__ import annotations

import math

import numpy as np

from kvcomm_jax.model.config import ModelConfig
from pallas_kernels.rotation import (
    rope as apply_rope,  # the one rotate-half implementation
)

__all__ = ["apply_rope", "inverse_frequencies"]


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, float32 ``[D/2]``, Llama-3 scaling applied if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)
