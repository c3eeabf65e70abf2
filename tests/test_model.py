"""Tiny random models: incremental decoding, batching, RoPE algebra, sampling, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.compile_counter import CompileCounter
from kvcomm_jax.model.config import RopeScaling, tiny_config
from kvcomm_jax.model.generation import generate
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.params import check_param_shapes, param_logical_axes, param_shapes
from kvcomm_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from kvcomm_jax.model.sampling import SamplingConfig, sample_next
from kvcomm_jax.model.transformer import forward, init_params

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
