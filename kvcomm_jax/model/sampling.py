"""Greedy and temperature / top-p (nucleus) sampling of the next token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy decoding; otherwise sample from the top-``top_p`` nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """``logits [B, V]`` float32 -> next token ids ``[B]`` int32."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / sampling.temperature  # [B, V]
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True) + 1  # [B, 1]
        threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)  # [B, 1]
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
