"""A Llama-family or Gemma 3 decoder in Flax (linen), run as a pure function of a params pytree.

``forward(params, tokens, positions, cache, config)`` is the whole model: it
embeds ``tokens [B, T]``, writes their keys/values into ``cache`` right after
each row's valid slots, attends causally over the cache, and returns logits
``[B, T, V]`` and the updated cache. Layers are stacked on a leading axis and
run with ``nn.scan`` (no Python loop over layers); what differs between layers
(RoPE frequencies, attention window) is scanned with them as :class:`PerLayer`.

Gemma 3's local layers keep full-length caches like every other layer and hide keys
outside their sliding window by position (:class:`~kvcomm_jax.model.attention.SlidingWindow`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.model.attention import (
    ReadBlock,
    SlidingWindow,
    blocked_attention,
    cache_source,
    recompute_source,
)
from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.kv_cache import KVCache
from kvcomm_jax.model.rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _write_rows(cache, new, starts):
    """Write ``new [L, B, H, T, D]`` into ``cache [L, B, H, S, D]`` at slot ``starts[b]`` of each row.

    One in-place ``dynamic_update_slice`` per row (``B`` is static and small).
    """
    for b in range(new.shape[1]):
        cache = jax.lax.dynamic_update_slice(cache, new[:, b : b + 1], (0, b, 0, starts[b], 0))
    return cache


def _dropped_padding(targets, num_new, capacity):
    """``targets [B, T]`` with each row's padding (``t >= num_new[b]``) sent out of bounds (slot ``capacity``)."""
    valid = jnp.arange(targets.shape[1])[None, :] < num_new[:, None]  # [B, T]
    return jnp.where(valid, targets, capacity).astype(jnp.int32)


def _scatter_rows(cache, new, targets):
    """Write ``new [L, B, H, T, D]`` into ``cache [L, B, H, S, D]`` at slots ``targets [B, T]`` (out of bounds: dropped)."""
    write = lambda c, n, t: c.at[:, :, t].set(n.astype(c.dtype), mode="drop")  # [L, H, S, D] per row
    return jax.vmap(write, in_axes=(1, 1, 0), out_axes=1)(cache, new, targets)


def _layer_reader(keys, values, layer) -> ReadBlock:
    """A block reader over layer ``layer`` of ``keys, values [L, B, H, S, D]``, sliced straight from the stack."""

    def read(start, size):
        _, B, H, _, D = keys.shape
        return tuple(jax.lax.dynamic_slice(a, (layer, 0, 0, start, 0), (1, B, H, size, D))[0] for a in (keys, values))

    return read


GLOBAL_WINDOW = np.iinfo(np.int32).max  # the window of a global layer: wider than any position difference


def attention_windows(config: ModelConfig) -> np.ndarray:
    """Per-layer attention windows, int32 ``[L]``: ``sliding_window`` on local layers, ``GLOBAL_WINDOW`` elsewhere."""
    local = np.asarray(config.local_layers)  # [L]
    return np.where(local, config.sliding_window or GLOBAL_WINDOW, GLOBAL_WINDOW).astype(np.int32)


class PerLayer(NamedTuple):
    """What differs between layers, stacked on a leading ``L`` axis and scanned with them.

    inv_freq: ``[L, D/2]`` float32 RoPE frequencies (``rope_tables``)
    window:   ``[L]`` int32 attention windows (``attention_windows``)
    index:    ``[L]`` int32 layer numbers (which layer of the cache stack to read)
    """

    inv_freq: jax.Array
    window: jax.Array
    index: jax.Array

    @classmethod
    def of(cls, config: ModelConfig) -> "PerLayer":
        return cls(jnp.asarray(rope_tables(config)), jnp.asarray(attention_windows(config)),
                   jnp.arange(config.num_layers, dtype=jnp.int32))


class Slots(NamedTuple):
    """Where the new tokens go and what they see; the same for every layer.

    positions: ``[B, T]`` RoPE positions of the tokens
    starts:    ``[B]`` cache slots valid before the call (appended tokens go right after them)
    num_new:   ``[B]`` valid tokens per row
    key_positions: ``[B, S]`` RoPE positions of the cache slots
    excluded:  ``[B, S]`` bool, slots being recomputed (hidden from the cache's side of
               attention), or None when the tokens are appended
    """

    positions: jax.Array
    starts: jax.Array
    num_new: jax.Array
    key_positions: jax.Array
    excluded: jax.Array | None = None


class Attention(nn.Module):
    """Grouped-query attention over the cache and the new tokens; returns the new keys/values.

    ``fresh``: the cache holds nothing yet (a prefill from scratch), so it is not read at
    all. Attention is :func:`~kvcomm_jax.model.attention.blocked_attention`: key blocks past
    each query block's causal diagonal and cache slots past the longest row are never read.
    The cache is only read here; :class:`Transformer` writes the new keys/values after the
    layer scan.
    """

    config: ModelConfig
    fresh: bool = False

    @nn.compact
    def __call__(self, x, keys, values, layer: PerLayer, slots: Slots):
        """x ``[B, T, E]``; caches ``[L, B, H, S, D]``; ``layer``: this layer's slice of
        :class:`PerLayer`. Returns ``(out [B, T, E], (k, v))``, the new keys/values
        ``[B, Hkv, T, D]`` in the cache dtype."""
        c = self.config
        B, T, _ = x.shape
        D, Hq, Hkv = c.head_dim, c.num_heads, c.num_kv_heads
        dense = functools.partial(nn.Dense, dtype=c.jnp_dtype, param_dtype=c.jnp_dtype)
        q = dense(Hq * D, use_bias=c.attention_bias, name="q_proj")(x).reshape(B, T, Hq, D)
        k = dense(Hkv * D, use_bias=c.attention_bias, name="k_proj")(x).reshape(B, T, Hkv, D)
        v = dense(Hkv * D, use_bias=c.attention_bias, name="v_proj")(x).reshape(B, T, Hkv, D)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        q = apply_rope(q.swapaxes(1, 2), slots.positions[:, None, :], layer.inv_freq)  # [B, Hq, T, D]
        k = apply_rope(k.swapaxes(1, 2), slots.positions[:, None, :], layer.inv_freq).astype(keys.dtype)  # [B, Hkv, T, D]
        v = v.swapaxes(1, 2).astype(values.dtype)  # [B, Hkv, T, D]
        cached = None
        if not self.fresh:
            cached = self._cache_source(_layer_reader(keys, values, layer.index), keys.shape[3], slots)
        window = None
        if c.sliding_window is not None:
            window = SlidingWindow(layer.window, slots.positions, slots.key_positions)
        q = q.reshape(B, Hkv, Hq // Hkv, T, D)  # [B, Hkv, G, T, D]
        out = blocked_attention(  # [B, Hkv, G, T, D]
            q, k, v, slots.num_new, cached, scale=c.attention_scale, logit_cap=c.attn_logit_softcapping, window=window
        )
        out = out.reshape(B, Hq, T, D).swapaxes(1, 2).reshape(B, T, Hq * D).astype(x.dtype)
        return dense(c.hidden_size, use_bias=False, name="o_proj")(out), (k, v)

    @staticmethod
    def _cache_source(read: ReadBlock, capacity: int, slots: Slots):
        if slots.excluded is None:  # appended tokens see every valid slot
            return cache_source(read, capacity, slots.starts)
        return recompute_source(read, capacity, slots.starts, slots.key_positions, slots.excluded, slots.positions)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, SwiGLU or GeGLU by ``config.hidden_activation``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=c.jnp_dtype, param_dtype=c.jnp_dtype)
        gate = dense(c.intermediate_size, name="gate_proj")(x)
        up = dense(c.intermediate_size, name="up_proj")(x)
        return dense(c.hidden_size, name="down_proj")(_ACTIVATIONS[c.hidden_activation](gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm block (with ``post_norms``, Gemma's norms on both block outputs too), scanned
    over layers: carries ``x``, returns this layer's new keys/values."""

    config: ModelConfig
    fresh: bool = False

    @nn.compact
    def __call__(self, x, layer: PerLayer, keys, values, slots: Slots):
        """x ``[B, T, E]``; ``layer`` is this layer's slice of :class:`PerLayer`; caches ``[L, B, H, S, D]`` (read only)."""
        c = self.config
        attn_out, new_kv = Attention(c, self.fresh, name="attn")(
            RMSNorm(c.rms_norm_eps, name="attn_norm")(x), keys, values, layer, slots
        )
        x = x + self._post_norm(attn_out, "post_attn_norm")
        mlp_out = MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="mlp_norm")(x))
        return x + self._post_norm(mlp_out, "post_mlp_norm"), new_kv

    def _post_norm(self, out, name: str):
        """``out`` normalised by norm ``name`` when the config has post-norms, else as is."""
        return RMSNorm(self.config.rms_norm_eps, name=name)(out) if self.config.post_norms else out


class Transformer(nn.Module):
    """Embedding, ``L`` scanned decoder layers, final norm; ``logits`` maps hidden states to the vocabulary.

    ``fresh=True`` promises an empty cache (lengths 0): attention then spans only the new tokens.

    The layer scan only reads the cache (a broadcast input, never a scanned input or carry)
    and returns each layer's new keys/values ``[L, B, H, T, D]``; one in-place write per row
    after the scan puts them in the cache. No step copies the cache (with the cache donated
    by the caller's jit): carrying it through the scan and writing it in each layer made
    XLA:CPU copy the whole cache in every layer, because those writes do not depend on the
    reads, and scanning it in and out (``[B, H, S, D]`` per layer) rewrote all of it every
    step.
    """

    config: ModelConfig
    fresh: bool = False

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.jnp_dtype, param_dtype=c.jnp_dtype)
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
        )(c, self.fresh)
        self.final_norm = RMSNorm(c.rms_norm_eps)
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=c.jnp_dtype, param_dtype=c.jnp_dtype)

    def __call__(self, tokens, positions, cache: KVCache, num_new, targets=None):
        """Hidden states ``[B, T, E]`` and the updated cache.

        ``targets`` None appends the tokens after each row's valid slots. Otherwise
        ``targets [B, T]`` are the slots (inside the valid ones, ascending, as are
        ``positions``) whose keys/values the tokens recompute; see :func:`forward`.
        """
        if targets is None:
            slots = Slots(positions, cache.lengths, num_new, cache.positions)
        else:
            targets = _dropped_padding(targets, num_new, cache.capacity)  # [B, T]
            excluded = jax.vmap(lambda t: jnp.zeros((cache.capacity,), bool).at[t].set(True, mode="drop"))(targets)
            slots = Slots(positions, cache.lengths, num_new, cache.positions, excluded)
        x, (new_keys, new_values) = self.layers(  # [L, B, H, T, D] each
            self._embed(tokens), PerLayer.of(self.config), cache.keys, cache.values, slots
        )
        positions = positions.astype(jnp.int32)
        if targets is None:
            starts = cache.lengths
            cache = KVCache(
                keys=_write_rows(cache.keys, new_keys, starts),
                values=_write_rows(cache.values, new_values, starts),
                positions=jax.vmap(lambda p, new, s: jax.lax.dynamic_update_slice_in_dim(p, new, s, axis=0))(
                    cache.positions, positions, starts
                ),
                lengths=starts + num_new,
            )
        else:
            cache = cache.replace(
                keys=_scatter_rows(cache.keys, new_keys, targets),
                values=_scatter_rows(cache.values, new_values, targets),
                positions=jax.vmap(lambda p, new, t: p.at[t].set(new, mode="drop"))(cache.positions, positions, targets),
            )
        return self.final_norm(x), cache

    def _embed(self, tokens):
        """Embeddings ``[B, T, E]`` of ``tokens [B, T]``, times ``sqrt(E)`` in the compute dtype with ``scale_embeddings``."""
        x = self.embed(tokens)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
        return x

    def hidden_and_logits(self, tokens, positions, cache: KVCache, num_new):
        """Both halves at once; used to create every parameter at init."""
        hidden, cache = self(tokens, positions, cache, num_new)
        return self.logits(hidden), cache

    def logits(self, hidden):
        """``hidden [..., E]`` -> float32 logits ``[..., V]`` (soft-capped with ``final_logit_softcapping``)."""
        if self.config.tie_embeddings:
            logits = self.embed.attend(hidden.astype(jnp.float32)).astype(jnp.float32)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)


def _check_capacity(tokens, cache: KVCache):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if tokens.shape[0] != cache.batch:
        raise ValueError(f"tokens batch {tokens.shape[0]} != cache batch {cache.batch}")


def _logits_and_cache(params, tokens, positions, cache: KVCache, config: ModelConfig, num_new, fresh, last_only, targets=None):
    """What :func:`forward` and :func:`forward_last` share: the model, then the logits.

    ``num_new`` None means ``T`` for every row. Returns ``(logits, cache)``: logits
    ``[B, T, V]``, or ``[B, V]`` for each row's last valid token (``num_new[b] - 1``)
    when ``last_only``.
    """
    _check_capacity(tokens, cache)
    if num_new is None:
        num_new = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    model = Transformer(config, fresh)
    hidden, cache = model.apply({"params": params}, tokens, positions, cache, num_new, targets)  # [B, T, E]
    if last_only:
        hidden = jnp.take_along_axis(hidden, (num_new - 1)[:, None, None], axis=1)[:, 0]  # [B, E]
    return model.apply({"params": params}, hidden, method=Transformer.logits), cache


@functools.partial(jax.jit, static_argnames=("config", "fresh"))
def forward(params, tokens, positions, cache: KVCache, config: ModelConfig, num_new=None, fresh: bool = False, targets=None):
    """The model as a pure function.

    Args:
      params: the params pytree (layout: ``kvcomm_jax.model.params.param_shapes``).
      tokens: int32 ``[B, T]``; row ``b`` has ``num_new[b]`` valid tokens (the rest is padding).
      positions: int32 ``[B, T]`` RoPE positions of the tokens.
      cache: a :class:`KVCache` with capacity ``S >= lengths + T``; the tokens are written
        to slots ``[lengths[b], lengths[b] + T)`` and attend to every slot before them.
      num_new: int32 ``[B]``, defaults to ``T`` for every row.
      fresh: the caller promises the cache is empty (a prefill from scratch); attention
        then reads only the new tokens, never the cache. Either way it reads no cache slot
        past the longest row and no key block past a query block's causal diagonal.
      targets: None appends the tokens as above. Otherwise int32 ``[B, T]``: the valid
        slots (``< lengths``) whose keys/values the tokens *recompute*, a set of any
        positions in any number of runs, ascending in each row with ``positions`` (padding
        past ``num_new`` is ignored). At every layer the tokens' keys/values go into those
        slots, and a slot is visible to a token when its position is not after the
        token's: the recomputed tokens among themselves causally, the other valid slots
        by ``cache.positions``. ``targets`` = every slot over an empty cache is a dense
        prefill; a suffix over an exact prefix is its continuation.

    Returns:
      ``(logits [B, T, V] float32, cache)`` with ``cache.lengths += num_new`` (unchanged
      when recomputing).
    """
    return _logits_and_cache(params, tokens, positions, cache, config, num_new, fresh, last_only=False, targets=targets)


@functools.partial(jax.jit, static_argnames=("config", "fresh"))
def forward_last(
    params, tokens, positions, cache: KVCache, config: ModelConfig, num_new, fresh: bool = False, targets=None
):
    """Like :func:`forward` but returns only the logits of each row's last valid token, ``[B, V]``.

    Saves the vocabulary projection of every other token during prefill.
    """
    return _logits_and_cache(params, tokens, positions, cache, config, num_new, fresh, last_only=True, targets=targets)


def init_params(config: ModelConfig, seed: int = 0):
    """Random params (Flax default initializers) for tests and tiny experiments."""
    from kvcomm_jax.model.kv_cache import init_cache

    cache = init_cache(config, 1, 1)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(config).init(
        jax.random.PRNGKey(seed), tokens, tokens, cache, jnp.ones((1,), jnp.int32), method=Transformer.hidden_and_logits
    )
    return variables["params"]
