"""Tiny random models: incremental decoding, batching, blocked attention, cache donation, RoPE, sampling, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.compile_counter import CompileCounter
from kvcomm_jax.model import attention
from kvcomm_jax.model.attention import blocked_attention, cache_source, slice_reader
from kvcomm_jax.model.config import RopeScaling, tiny_config
from kvcomm_jax.model.generation import decode, generate, pad_prompts, prefill
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.params import check_param_shapes, param_logical_axes, param_shapes
from kvcomm_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from kvcomm_jax.model.sampling import SamplingConfig, sample_next
from kvcomm_jax.model.transformer import _logits_and_cache, forward, init_params

CONFIGS = {
    "llama": tiny_config(),
    "tied": tiny_config(tie_embeddings=True),
    "qwen2": tiny_config(architecture="qwen2", attention_bias=True),
    "qwen3": tiny_config(architecture="qwen3", qk_norm=True),
    "llama3_scaling": tiny_config(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), rope_theta=500000.0),
}


def _tokens(n, seed=0, vocab=97):
    return np.random.RandomState(seed).randint(0, vocab, n).tolist()


def _full_logits(params, config, ids, capacity=64):
    tokens = jnp.asarray([ids], jnp.int32)
    logits, _ = forward(params, tokens, jnp.arange(len(ids))[None], init_cache(config, 1, capacity), config)
    return np.asarray(logits[0])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
    config = CONFIGS[name]
    params = init_params(config, seed=1)
    check_param_shapes(config, params)
    ids = _tokens(20)
    full = _full_logits(params, config, ids)

    cache = init_cache(config, 1, 64)
    logits, cache = forward(params, jnp.asarray([ids[:12]]), jnp.arange(12)[None], cache, config)
    pieces = [np.asarray(logits[0])]
    for t in range(12, 20):
        step, cache = forward(params, jnp.asarray([[ids[t]]]), jnp.asarray([[t]]), cache, config)
        pieces.append(np.asarray(step[0]))
    incremental = np.concatenate(pieces)
    np.testing.assert_allclose(incremental, full, rtol=1e-5, atol=1e-5)
    assert int(cache.lengths[0]) == 20


def test_batched_rows_with_different_lengths_match_single_rows():
    config = CONFIGS["llama"]
    params = init_params(config)
    prompts = [_tokens(9, 1), _tokens(4, 2), _tokens(14, 3)]
    tokens = np.zeros((3, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    num_new = jnp.asarray([len(p) for p in prompts], jnp.int32)
    logits, cache = forward(
        params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(16), (3, 16)), init_cache(config, 3, 64), config, num_new
    )
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(logits[i, : len(p)]), _full_logits(params, config, p), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9, 4, 14])

    batched = generate(params, config, prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):
        single = generate(params, config, [p], max_new_tokens=6)
        assert batched.tokens[i] == single.tokens[0]


def test_generation_matches_argmax_of_full_forward_and_fills_cache():
    config = CONFIGS["llama"]
    params = init_params(config, seed=3)
    prompt = _tokens(7, 5)
    out = generate(params, config, [prompt], max_new_tokens=8)
    response = out.tokens[0]
    assert len(response) == 8
    logits = _full_logits(params, config, prompt + response)
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1 : -1], axis=-1), response)
    assert int(out.cache.lengths[0]) == len(prompt) + len(response)


def test_stop_token_ends_generation_and_is_not_returned():
    config = CONFIGS["llama"]
    params = init_params(config, seed=3)
    prompt = _tokens(7, 5)
    free = generate(params, config, [prompt], max_new_tokens=8).tokens[0]
    stop = free[3]
    stopped = generate(params, config, [prompt], max_new_tokens=8, stop_ids=[stop]).tokens[0]
    assert stopped == free[: free.index(stop)]


def test_rope_rotation_composes_additively():
    config = CONFIGS["llama3_scaling"]
    inv = inverse_frequencies(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, config.head_dim))
    a = jnp.arange(5)[None] + 3
    b = jnp.full((1, 5), 11)
    np.testing.assert_allclose(apply_rope(apply_rope(x, a, inv), b, inv), apply_rope(x, a + b, inv), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply_rope(apply_rope(x, a, inv), -a, inv), x, rtol=1e-5, atol=1e-5)


def test_rope_tables_give_every_layer_the_model_frequencies():
    config = CONFIGS["llama3_scaling"]
    tables = rope_tables(config)
    assert tables.shape == (config.num_layers, config.head_dim // 2) and tables.dtype == np.float32
    np.testing.assert_array_equal(tables, np.broadcast_to(inverse_frequencies(config), tables.shape))


def test_llama3_scaling_changes_only_low_frequencies():
    plain = inverse_frequencies(tiny_config(head_dim=64, rope_theta=500000.0))
    scaled = inverse_frequencies(CONFIGS["llama3_scaling"].replace(head_dim=64))
    assert scaled[0] == pytest.approx(plain[0])  # highest frequency untouched
    assert scaled[-1] == pytest.approx(plain[-1] / 8.0)  # lowest divided by the factor


def test_sampling_greedy_top_p_and_seed():
    logits = jnp.asarray([[0.0, 5.0, 1.0, 4.9]])
    key = jax.random.PRNGKey(0)
    assert int(sample_next(logits, key, SamplingConfig())[0]) == 1
    # top_p small keeps only the best token whatever the temperature
    for seed in range(5):
        assert int(sample_next(logits, jax.random.PRNGKey(seed), SamplingConfig(temperature=5.0, top_p=0.01))[0]) == 1
    draws = {int(sample_next(logits, jax.random.PRNGKey(s), SamplingConfig(temperature=1.0, top_p=0.9))[0]) for s in range(40)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_same_bucket_prompt_does_not_recompile():
    config = CONFIGS["llama"]
    params = init_params(config)
    generate(params, config, [_tokens(10)], max_new_tokens=4)
    with CompileCounter() as counter:
        generate(params, config, [_tokens(13, 7)], max_new_tokens=4)
    assert counter.count == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logical_axes_name_every_dimension(name):
    config = CONFIGS[name]
    is_tuple = lambda x: isinstance(x, tuple)
    shapes, axes = param_shapes(config), param_logical_axes(config)
    assert jax.tree.structure(axes, is_leaf=is_tuple) == jax.tree.structure(shapes, is_leaf=is_tuple)
    known = {"layers", "embed", "heads", "kv_heads", "mlp", "vocab", "head_dim"}
    for names, shape in zip(jax.tree.leaves(axes, is_leaf=is_tuple), jax.tree.leaves(shapes, is_leaf=is_tuple)):
        assert len(names) == len(shape) and set(names) <= known


def test_bad_prompts_raise_clear_errors():
    config = CONFIGS["llama"]
    params = init_params(config)
    with pytest.raises(ValueError, match="empty"):
        generate(params, config, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="context limit of 512"):
        generate(params, config, [_tokens(510)], max_new_tokens=4)
    with pytest.raises(ValueError, match="missing"):
        check_param_shapes(config, {"embed": {}})


def test_fresh_prefill_equals_prefill_over_the_whole_cache():
    config = CONFIGS["qwen3"]
    params = init_params(config, seed=2)
    ids = jnp.asarray([_tokens(11, 4)])
    positions = jnp.arange(11)[None]
    full, cache_full = forward(params, ids, positions, init_cache(config, 1, 64), config)
    fresh, cache_fresh = forward(params, ids, positions, init_cache(config, 1, 64), config, fresh=True)
    np.testing.assert_allclose(fresh, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache_fresh.keys, cache_full.keys, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache_fresh.lengths, cache_full.lengths)


# ---- blocked attention against a full-matrix reference ----

# Many blocks even at test sizes; key blocks smaller than query blocks, so a query block's
# causal diagonal spans two key blocks; one-query blocks (decode) use blocks of 8 keys.
SMALL_BLOCKS = {"Q_BLOCK": 8, "K_BLOCK": 4, "DECODE_K_BLOCK": 8, "SMALL_QUERY_BLOCK": 1}


@pytest.fixture
def small_blocks(monkeypatch):
    """Small attention blocks (``SMALL_BLOCKS``), so loops, causal skips and ragged ends all run.

    The constants are read when a function is traced: call ``blocked_attention`` directly
    or through a new ``jax.jit``, never through a jit that may already hold a trace.
    """
    for name, value in SMALL_BLOCKS.items():
        monkeypatch.setattr(attention, name, value)


def _reference_attention(q, keys, values, query_slots):
    """float64 softmax over the whole ``[T, S]`` score matrix; a query sees the slots ``s <= query_slots``.

    ``q [B, Hkv, G, T, D]``; ``keys, values [B, Hkv, S, D]``; ``query_slots [B, T]``.
    """
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    scores = np.einsum("bhgtd,bhsd->bhgts", q, keys) / np.sqrt(q.shape[-1])
    visible = np.arange(keys.shape[2])[None, None, :] <= np.asarray(query_slots)[:, :, None]  # [B, T, S]
    scores = np.where(visible[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.einsum("bhgts,bhsd->bhgtd", probs / probs.sum(axis=-1, keepdims=True), values)


def _attention_case(B, T, S, seed=0, Hkv=2, G=3, D=8):
    """Random queries ``[B, Hkv, G, T, D]`` and a cache ``[B, Hkv, S, D]`` whose unused slots hold large junk."""
    rng = np.random.RandomState(seed)
    q = rng.randn(B, Hkv, G, T, D).astype(np.float32)
    keys = (rng.randn(B, Hkv, S, D) * 1e3).astype(np.float32)
    values = (rng.randn(B, Hkv, S, D) * 1e3).astype(np.float32)
    return q, keys, values, rng


def _assert_valid_rows_close(out, ref, num_new):
    """Queries ``t < num_new[b]`` of ``out`` and ``ref`` ``[B, Hkv, G, T, D]`` agree to 1e-5 relative."""
    for b, n in enumerate(np.asarray(num_new)):
        got, want = np.asarray(out)[b, :, :, :n], ref[b, :, :, :n]
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), f"row {b}"


def test_blocked_attention_fresh_prefill_matches_reference(small_blocks):
    B, T = 3, 40
    q, keys, values, _ = _attention_case(B, T, T)
    keys, values = keys / 1e3, values / 1e3
    num_new = np.asarray([40, 13, 1], np.int32)  # ragged rows: whole padding blocks are skipped
    out = jax.jit(blocked_attention)(q, keys, values, num_new)
    ref = _reference_attention(q, keys, values, np.broadcast_to(np.arange(T), (B, T)))
    _assert_valid_rows_close(out, ref, num_new)


def _attention_over_cache(q, new_k, new_v, cache_k, cache_v, starts, num_new):
    """:func:`blocked_attention` of the new tokens over ``cache_k, cache_v [B, Hkv, S, D]`` (rows hold ``starts`` slots)."""

    @jax.jit
    def run(q, new_k, new_v, cache_k, cache_v):
        cached = cache_source(slice_reader(cache_k, cache_v), cache_k.shape[2], starts)
        return blocked_attention(q, new_k, new_v, num_new, cached)

    return run(q, new_k, new_v, cache_k, cache_v)


def test_blocked_attention_with_prime_lengths_matches_reference(small_blocks):
    """37 new tokens over a 61-slot cache: no block size divides either, so the last blocks are ragged."""
    B, T, S = 2, 37, 61
    q, cache_k, cache_v, rng = _attention_case(B, T, S, seed=2)
    starts, num_new = np.asarray([0, 23], np.int32), np.asarray([37, 30], np.int32)
    new_k, new_v = rng.randn(2, B, 2, T, 8).astype(np.float32)
    cache_k, cache_v = cache_k / 1e3, cache_v / 1e3
    full_k = np.concatenate([cache_k, np.zeros_like(new_k)], axis=2)  # room for the new tokens
    full_v = np.concatenate([cache_v, np.zeros_like(new_v)], axis=2)
    for b, s in enumerate(starts):
        full_k[b, :, s : s + T], full_v[b, :, s : s + T] = new_k[b], new_v[b]

    out = _attention_over_cache(q, new_k, new_v, cache_k, cache_v, starts, num_new)
    ref = _reference_attention(q, full_k, full_v, starts[:, None] + np.arange(T)[None])
    _assert_valid_rows_close(out, ref, num_new)
    fresh = jax.jit(blocked_attention)(q, new_k, new_v, num_new)
    _assert_valid_rows_close(fresh, _reference_attention(q, new_k, new_v, np.broadcast_to(np.arange(T), (B, T))), num_new)


def test_blocked_attention_prefill_over_a_partly_filled_cache_matches_reference(small_blocks):
    B, T, S = 3, 12, 64
    q, cache_k, cache_v, rng = _attention_case(B, T, S, seed=1)
    starts = np.asarray([0, 5, 37], np.int32)
    num_new = np.asarray([12, 7, 3], np.int32)
    new_k, new_v = rng.randn(2, B, 2, T, 8).astype(np.float32)
    for b, s in enumerate(starts):
        cache_k[b, :, :s] /= 1e3  # the valid slots hold ordinary values; the rest stays junk
        cache_v[b, :, :s] /= 1e3
    full_k, full_v = cache_k.copy(), cache_v.copy()  # the cache once the new tokens are written
    for b, s in enumerate(starts):
        full_k[b, :, s : s + T], full_v[b, :, s : s + T] = new_k[b], new_v[b]

    out = _attention_over_cache(q, new_k, new_v, cache_k, cache_v, starts, num_new)
    ref = _reference_attention(q, full_k, full_v, starts[:, None] + np.arange(T)[None])
    _assert_valid_rows_close(out, ref, num_new)


def test_blocked_attention_decode_with_ragged_rows_matches_reference(small_blocks):
    B, S = 4, 96
    q, cache_k, cache_v, rng = _attention_case(B, 1, S, seed=2)
    lengths = np.asarray([3, 60, 17, 0], np.int32)  # the longest row ends in the middle of the cache
    new_k, new_v = rng.randn(2, B, 2, 1, 8).astype(np.float32)
    for b, n in enumerate(lengths):
        cache_k[b, :, :n] /= 1e3
        cache_v[b, :, :n] /= 1e3
    full_k, full_v = cache_k.copy(), cache_v.copy()
    full_k[np.arange(B), :, lengths], full_v[np.arange(B), :, lengths] = new_k[:, :, 0], new_v[:, :, 0]

    @jax.jit
    def run(q, new_k, new_v, cache_k, cache_v):
        cached = cache_source(slice_reader(cache_k, cache_v), S, lengths)
        return blocked_attention(q, new_k, new_v, np.ones(B, np.int32), cached)

    out = run(q, new_k, new_v, cache_k, cache_v)
    _assert_valid_rows_close(out, _reference_attention(q, full_k, full_v, lengths[:, None]), np.ones(B, np.int32))


def test_model_with_small_attention_blocks_matches_single_rows(small_blocks):
    """Prefill and cached prefill of ragged rows through many blocks equal each row run alone."""
    config = CONFIGS["qwen3"]
    params = init_params(config, seed=4)
    run = jax.jit(functools.partial(_logits_and_cache, config=config, last_only=False), static_argnames="fresh")
    prompts = [_tokens(37, 1), _tokens(9, 2), _tokens(24, 3)]
    tokens, positions, num_new = pad_prompts(prompts)  # [3, 64]
    logits, cache = run(params, tokens, positions, init_cache(config, 3, 128), num_new=num_new, fresh=True)
    more = jnp.asarray(np.stack([_tokens(16, 10 + i) for i in range(3)]), jnp.int32)  # a second, cached prefill
    more_logits, cache = run(params, more, num_new[:, None] + jnp.arange(16)[None], cache, num_new=None, fresh=False)
    for i, p in enumerate(prompts):
        alone = _full_logits(params, config, p + _tokens(16, 10 + i), capacity=128)
        np.testing.assert_allclose(logits[i, : len(p)], alone[: len(p)], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(more_logits[i], alone[len(p) :], rtol=1e-5, atol=1e-5)


# ---- donated caches ----


def test_prefill_and_decode_donate_the_cache():
    """XLA:CPU honours donation: the cache passed in is deleted, its buffers reused for the result."""
    config = CONFIGS["llama"]
    params = init_params(config)
    tokens, positions, lengths = pad_prompts([_tokens(9)])
    cache = init_cache(config, 1, 64)
    key, sampling = jax.random.PRNGKey(0), SamplingConfig()
    first, _, filled = prefill(params, tokens, positions, lengths, cache, key, config, sampling, fresh=True)
    assert cache.keys.is_deleted() and cache.values.is_deleted()
    _, count, final = decode(params, first, lengths, filled, jnp.asarray([-1]), key, config, sampling, 4)
    assert filled.keys.is_deleted() and filled.values.is_deleted()
    assert int(final.lengths[0]) == 9 + int(count[0]) == 13
