"""Engine probes: measurements run on every reuse call, outside its TTFT.

A probe is called once per batched step as ``probe(engine, calls, cache, first_tokens [B], key)``
and returns one dict per call, merged into that call record's ``fidelity`` (see
:class:`~kvcomm_jax.kvcomm.engine.KVCommEngine`). :func:`per_call` builds one from a
function of a single call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.kvcomm.strategies import RotateOnly
from kvcomm_jax.model.kv_cache import KVCache, take_rows


def per_call(measure):
    """A probe from ``measure(engine, call, cache_row, first_token [1], key) -> dict``, run row by row."""

    def probe(engine, calls, cache: KVCache, first, key) -> list[dict]:
        return [
            measure(engine, call, take_rows(cache, jnp.asarray([row], jnp.int32)), first[row : row + 1], key)
            for row, call in enumerate(calls)
        ]

    return probe


@jax.jit
def layer_relative_errors(a: KVCache, b: KVCache, n):
    """Per-layer ``||a - b||_F / ||b||_F`` over the first ``n`` slots of row 0, keys and values: ``([L], [L])``."""
    S = min(a.capacity, b.capacity)
    mask = (jnp.arange(S) < n)[None, None, :, None]  # [1, 1, S, 1]

    def err(x, y):
        x, y = x[:, 0, :, :S].astype(jnp.float32), y[:, 0, :, :S].astype(jnp.float32)  # [L, H, S, D]
        num = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(x - y), 0.0), axis=(1, 2, 3)))
        den = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(y), 0.0), axis=(1, 2, 3)))
        return num / jnp.maximum(den, 1e-30)

    return err(a.keys, b.keys), err(a.values, b.values)


def _kv_fidelity(engine, call, reuse_cache: KVCache, reuse_first, key) -> dict:
    """Engine probe: per-layer relative KV error of the reuse cache vs a dense prefill of the same prompt.

    Also reports the same cache without offsets (rotation only), first-token agreement
    with dense, and the dense prefill's warm TTFT on the identical prompt.
    """
    dense_first, dense_cache, dense_ms, _ = engine.runner.prefill([call.ids], call.capacity, key)
    n = len(call.ids) - 1
    k_err, v_err = layer_relative_errors(reuse_cache, dense_cache, n)
    k_rot, v_rot = layer_relative_errors(engine.reuse_cache(call, RotateOnly()), dense_cache, n)
    return {
        "key_error": np.asarray(k_err).tolist(),
        "value_error": np.asarray(v_err).tolist(),
        "rotate_only_key_error": np.asarray(k_rot).tolist(),
        "rotate_only_value_error": np.asarray(v_rot).tolist(),
        "first_token_agrees": bool(int(dense_first[0]) == int(reuse_first[0])),
        "dense_first_token": int(dense_first[0]),
        "dense_ttft_ms": dense_ms,
    }


kv_fidelity = per_call(_kv_fidelity)
