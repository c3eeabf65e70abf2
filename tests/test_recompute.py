"""One forward over any set of prompt tokens (``targets``): against dense prefill and a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.kv_cache import init_cache, with_lengths
from kvcomm_jax.model.transformer import _logits_and_cache, forward, init_params

CONFIG = tiny_config()
CAPACITY = 48


def _ids(n, seed=0):
    return np.random.RandomState(seed).randint(0, CONFIG.vocab_size, n).astype(np.int32)


def _dense(params, ids):
    """Logits ``[P, V]`` and cache of a dense prefill of ``ids``."""
    return forward(params, jnp.asarray(ids)[None], jnp.arange(len(ids))[None], init_cache(CONFIG, 1, CAPACITY), CONFIG)


def _junk_cache(n, seed=1):
    """A cache with ``n`` valid slots at positions ``0 .. n-1`` holding random keys/values."""
    rng = np.random.RandomState(seed)
    cache = init_cache(CONFIG, 1, CAPACITY)
    shape = cache.keys.shape
    positions = np.zeros((1, CAPACITY), np.int32)
    positions[0, :n] = np.arange(n)
    return cache.replace(
        keys=jnp.asarray(rng.normal(size=shape), jnp.float32),
        values=jnp.asarray(rng.normal(size=shape), jnp.float32),
        positions=jnp.asarray(positions),
        lengths=jnp.asarray([n], jnp.int32),
    )


def _recompute(params, ids, targets, cache, pad_to=None):
    """Recompute slots ``targets`` (list) of ``cache`` with the tokens ``ids[targets]``; padded to ``pad_to``."""
    T = pad_to or len(targets)
    slots = np.zeros((1, T), np.int32)
    slots[0, : len(targets)] = targets
    tokens = np.asarray(ids)[slots]
    return forward(
        params, jnp.asarray(tokens), jnp.asarray(slots), cache, CONFIG, num_new=jnp.asarray([len(targets)]), targets=jnp.asarray(slots)
    )


def _assert_close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), np.abs(a - b).max()


@pytest.mark.parametrize("pad_to", [None, 24])
def test_recomputing_every_token_equals_a_dense_prefill(pad_to):
    params = init_params(CONFIG, seed=3)
    ids = _ids(19)
    dense_logits, dense_cache = _dense(params, ids)
    logits, cache = _recompute(params, ids, list(range(19)), _junk_cache(19), pad_to)
    _assert_close(logits[0, :19], dense_logits[0])
    for name in ("keys", "values"):  # every layer's KV
        _assert_close(getattr(cache, name)[:, :, :, :19], getattr(dense_cache, name)[:, :, :, :19])
    assert int(cache.lengths[0]) == 19
    np.testing.assert_array_equal(np.asarray(cache.positions[0, :19]), np.arange(19))


def test_recomputing_a_suffix_over_an_exact_prefix_equals_a_dense_prefill():
    params = init_params(CONFIG, seed=4)
    ids = _ids(23, seed=5)
    dense_logits, dense_cache = _dense(params, ids)
    _, prefix = _dense(params, ids[:15])
    junk = _junk_cache(23, seed=6)
    mixed = junk.replace(  # exact prefix, junk in the slots to be recomputed
        keys=junk.keys.at[:, :, :, :15].set(prefix.keys[:, :, :, :15]),
        values=junk.values.at[:, :, :, :15].set(prefix.values[:, :, :, :15]),
    )
    logits, cache = _recompute(params, ids, list(range(15, 23)), mixed)
    _assert_close(logits[0], dense_logits[0, 15:])
    _assert_close(cache.keys[:, :, :, :23], dense_cache.keys[:, :, :, :23])
    _assert_close(cache.values[:, :, :, :23], dense_cache.values[:, :, :, :23])


def test_appending_is_unchanged_by_the_recompute_path():
    """``targets`` = the slots right after the valid ones, with lengths covering them, equals appending."""
    params = init_params(CONFIG, seed=7)
    ids = _ids(12, seed=8)
    _, prefix = _dense(params, ids[:9])
    appended, after_append = forward(params, jnp.asarray(ids[9:])[None], jnp.arange(9, 12)[None], prefix, CONFIG)
    _, prefix = _dense(params, ids[:9])
    recomputed, after_recompute = _recompute(params, ids, [9, 10, 11], with_lengths(prefix, [12]))
    _assert_close(recomputed, appended)
    _assert_close(after_recompute.keys, after_append.keys)


# ---- an independent numpy forward of the same definition ----


def _np_rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CONFIG.rms_norm_eps) * scale


def _np_rope(x, positions):
    """Rotate-half RoPE of ``x [H, T, D]`` at ``positions [T]``."""
    D = x.shape[-1]
    inv_freq = CONFIG.rope_theta ** (-np.arange(0, D, 2) / D)
    angle = positions[:, None] * inv_freq[None]  # [T, D/2]
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_recompute(params, ids, targets, keys, values, positions, length):
    """float64 logits of tokens ``ids[targets]`` whose KV replace slots ``targets`` of ``keys, values [L, H, S, D]``.

    Slot ``s < length`` is visible to token ``t`` when ``positions[s] <= targets[t]`` (targets are positions).
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    layers, L = p["layers"], CONFIG.num_layers
    H, Hkv, D = CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim
    targets = np.asarray(targets)
    keys, values = np.array(keys, np.float64), np.array(values, np.float64)
    slot_positions = np.array(positions)
    slot_positions[targets] = targets
    x = p["embed"]["embedding"][np.asarray(ids)[targets]]  # [T, E]
    for layer in range(L):
        attn = layers["attn"]
        h = _np_rms(x, layers["attn_norm"]["scale"][layer])
        q = (h @ attn["q_proj"]["kernel"][layer]).reshape(-1, H, D).transpose(1, 0, 2)  # [H, T, D]
        k = (h @ attn["k_proj"]["kernel"][layer]).reshape(-1, Hkv, D).transpose(1, 0, 2)
        v = (h @ attn["v_proj"]["kernel"][layer]).reshape(-1, Hkv, D).transpose(1, 0, 2)
        keys[layer][:, targets] = _np_rope(k, targets)
        values[layer][:, targets] = v
        q = _np_rope(q, targets)
        k_all = np.repeat(keys[layer][:, :length], H // Hkv, axis=0)  # [H, S, D]
        v_all = np.repeat(values[layer][:, :length], H // Hkv, axis=0)
        scores = q @ k_all.transpose(0, 2, 1) / np.sqrt(D)  # [H, T, S]
        visible = slot_positions[None, :length] <= targets[:, None]  # [T, S]
        scores = np.where(visible[None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = (weights @ v_all).transpose(1, 0, 2).reshape(len(targets), H * D)
        x = x + out @ attn["o_proj"]["kernel"][layer]
        h = _np_rms(x, layers["mlp_norm"]["scale"][layer])
        mlp = layers["mlp"]
        gate = h @ mlp["gate_proj"]["kernel"][layer]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ mlp["up_proj"]["kernel"][layer])) @ mlp["down_proj"]["kernel"][layer]
    return _np_rms(x, p["final_norm"]["scale"]) @ p["lm_head"]["kernel"], keys, values


@pytest.mark.parametrize("targets", [[2, 3, 4, 9, 10, 16, 17, 18, 21], [0, 7, 13, 20], [21]])
def test_recomputing_several_runs_equals_a_numpy_reference(targets):
    params = init_params(CONFIG, seed=9)
    ids = _ids(22, seed=10)
    cache = _junk_cache(22, seed=11)
    logits, out = _recompute(params, ids, targets, cache, pad_to=12)
    ref_logits, ref_keys, ref_values = _np_recompute(
        params, ids, targets, cache.keys[:, 0], cache.values[:, 0], np.asarray(cache.positions[0]), 22
    )
    _assert_close(logits[0, : len(targets)], ref_logits)
    _assert_close(out.keys[:, 0, :, :22], ref_keys[:, :, :22])
    _assert_close(out.values[:, 0, :, :22], ref_values[:, :, :22])


def test_rows_recompute_independently():
    """Two rows with different target sets and counts equal each row run alone."""
    params = init_params(CONFIG, seed=12)
    ids = [_ids(20, seed=13), _ids(20, seed=14)]
    sets = [[3, 4, 5, 19], [10, 19]]
    caches = [_junk_cache(20, seed=15), _junk_cache(20, seed=16)]
    singles = [_recompute(params, i, t, c, pad_to=4) for i, t, c in zip(ids, sets, caches)]
    slots = np.zeros((2, 4), np.int32)
    for b, t in enumerate(sets):
        slots[b, : len(t)] = t
    tokens = np.stack([i[s] for i, s in zip(ids, slots)])
    both = caches[0].replace(**{
        name: jnp.concatenate([getattr(c, name) for c in caches], axis=1 if name in ("keys", "values") else 0)
        for name in ("keys", "values", "positions", "lengths")
    })
    logits, out = _logits_and_cache(
        params, jnp.asarray(tokens), jnp.asarray(slots), both, CONFIG, jnp.asarray([4, 2]), False, False, jnp.asarray(slots)
    )
    for b, (single_logits, single_cache) in enumerate(singles):
        n = len(sets[b])
        _assert_close(logits[b, :n], single_logits[0, :n])
        _assert_close(out.keys[:, b], single_cache.keys[:, 0])
