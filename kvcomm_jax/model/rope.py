"""Rotate-half rotary position embeddings (RoPE), with optional Llama-3 frequency scaling.

Rotate-half convention: for ``x [..., D]`` with halves ``x1 = x[..., :D/2]`` and
``x2 = x[..., D/2:]``, rotating by ``amount`` uses ``angle = amount * inv_freq`` and gives
``concat(x1*cos - x2*sin, x2*cos + x1*sin)``. Math in float32, one cast back to the
input dtype.

A vector rotated to position ``a`` and then by ``b`` equals the vector rotated
to ``a + b`` (``R(a) R(b) = R(a + b)``); the KVCOMM engine relies on this to
move cached keys between positions.

This module is the one implementation of the rotation: the Pallas kernels in
``pallas_kernels`` import ``cos_sin`` and ``rotate_halves`` from here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.model.config import ModelConfig

__all__ = ["apply_rope", "cos_sin", "inverse_frequencies", "rope_tables", "rotate_halves"]


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


def rope_tables(config: ModelConfig) -> np.ndarray:
    """Per-layer rotation frequencies, float32 ``[L, D/2]``: row ``l`` rotates layer ``l``.

    Global layers use ``inverse_frequencies(config)``; local (sliding-window) layers use
    the base ``rope_local_theta`` without scaling when it is set (Gemma 3: 1e4 locally,
    1e6 globally). In the Llama family every row is the same.
    """
    global_freqs = inverse_frequencies(config)  # [D/2]
    local_freqs = global_freqs
    if config.rope_local_theta is not None:
        local_freqs = inverse_frequencies(config.replace(rope_theta=config.rope_local_theta, rope_scaling=None))
    local = np.asarray(config.local_layers)[:, None]  # [L, 1]
    return np.where(local, local_freqs, global_freqs)  # [L, D/2]


def cos_sin(amounts: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of ``amounts[..., t] * inv_freq[..., c]``, float32 ``[..., T, D/2]`` each.

    ``amounts [..., T]`` and ``inv_freq [..., D/2]`` broadcast against each other after
    ``amounts`` gains a trailing pair axis (``[T]`` amounts with ``[L, 1, 1, D/2]``
    frequencies give ``[L, 1, T, D/2]``).
    """
    angle = amounts.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [..., T, D/2]
    return jnp.cos(angle), jnp.sin(angle)


def rotate_halves(x1, x2, cos, sin):
    """Rotates the float32 halves ``x1, x2 [..., D/2]`` by the angles of ``cos, sin``."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """``x [..., T, D]`` with every token t rotated by ``positions[..., t]``, in ``x.dtype``.

    ``positions`` is ``[T]`` or any shape that broadcasts against ``x[..., 0]`` (for example
    ``[B, 1, T]`` positions for ``[B, H, T, D]`` queries). ``inv_freq`` is float32 ``[D/2]``
    or any ``[..., D/2]`` that broadcasts against ``x[..., 0, :D/2]`` (``[L, 1, 1, D/2]``
    rotates each layer of ``[L, H, T, D]`` keys by its own frequencies). Math in float32,
    one cast back.
    """
    half = x.shape[-1] // 2
    cos, sin = cos_sin(positions, inv_freq)  # [..., T, D/2]
    xf = x.astype(jnp.float32)  # [..., T, D]
    r1, r2 = rotate_halves(xf[..., :half], xf[..., half:], cos, sin)  # [..., T, D/2] each
    return jnp.concatenate([r1, r2], axis=-1).astype(x.dtype)
