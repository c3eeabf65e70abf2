"""CacheBlend's token selection (Yao et al., "CacheBlend: Fast Large Language Model Serving
for RAG with Cached Knowledge Fusion", EuroSys 2025), as a baseline to KVCOMM's own.

CacheBlend reuses each text's KV computed on its own, re-positioned, and recomputes a
small fraction of "high-KV-deviation" tokens. The selection rule: compute the first
layers for every prompt token (layer 0's KV is context independent, so the first layer
where reuse deviates is layer 1), measure each token's value deviation between the
fresh and the reused KV on that layer, and recompute the tokens of largest deviation in
all later layers. Its public implementation checks one layer (layer 1); so does this
one. The fresh KV of the checked layers is kept for every token, as there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.kv_cache import KVCache, init_cache
from kvcomm_jax.model.transformer import forward_last

CHECK_LAYER = 1


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def first_layers_deviation(params, tokens, lengths, cache: KVCache, config: ModelConfig):
    """Layers ``0 .. CHECK_LAYER`` computed fresh for every prompt token, and each token's deviation.

    tokens: ``[B, T]`` the prompts (``lengths [B]`` valid); cache: the reused cache
    ``[L, B, H, S, D]`` (donated). Returns ``(cache, deviation [B, S])``: the cache with the
    checked layers' KV replaced by the fresh ones over each prompt, and per slot the norm of
    the fresh minus reused values of layer ``CHECK_LAYER`` (0 past the prompt).
    """
    layers = CHECK_LAYER + 1
    head = dataclasses.replace(config, num_layers=layers)
    head_params = {**params, "layers": jax.tree.map(lambda a: a[:layers], params["layers"])}
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    _, fresh = forward_last(
        head_params, tokens, positions, init_cache(head, B, cache.capacity), head, lengths, fresh=True
    )  # fresh.keys [layers, B, H, S, D]
    inside = (jnp.arange(cache.capacity)[None, :] < lengths[:, None])  # [B, S]
    moved = fresh.values[CHECK_LAYER].astype(jnp.float32) - cache.values[CHECK_LAYER].astype(jnp.float32)  # [B, H, S, D]
    deviation = jnp.where(inside, jnp.sqrt(jnp.sum(jnp.square(moved), axis=(1, 3))), 0.0)  # [B, S]
    keep = inside[None, :, None, :, None]  # [1, B, 1, S, 1]
    cache = cache.replace(
        keys=cache.keys.at[:layers].set(jnp.where(keep, fresh.keys, cache.keys[:layers])),
        values=cache.values.at[:layers].set(jnp.where(keep, fresh.values, cache.values[:layers])),
    )
    return cache, deviation
