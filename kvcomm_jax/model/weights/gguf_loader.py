"""Load llama.cpp GGUF files (any quantization ``gguf`` can dequantize) into our params pytree."""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.config import GEMMA3_FLAGS, ModelConfig, RopeScaling
from kvcomm_jax.model.params import PARAMS_BY_PATH, Param
from kvcomm_jax.model.rope import inverse_frequencies
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.model.weights import assemble_params

# architecture -> (ModelConfig flags, whether llama.cpp permuted the Q/K rows for interleaved RoPE)
_ARCHITECTURES = {
    "llama": ({}, True),
    "qwen2": ({"attention_bias": True}, False),
    "qwen3": ({"qk_norm": True}, False),
    "gemma3": (GEMMA3_FLAGS, False),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_ARCHITECTURES)
# Gemma 3 conventions its GGUF metadata does not carry: five local layers, then one global;
# RoPE base 1e4 on local layers; queries scaled by 1/sqrt(head_dim), except in the 27B model
# (62 layers, as llama.cpp tells it), whose query_pre_attn_scalar is hidden_size / heads.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA, _GEMMA3_27B_LAYERS = 6, 10000.0, 62

_ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation of ``w [n_heads*D, ...]`` (interleaved -> rotate-half)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str) -> gguf.GGUFReader:
    """A reader over the GGUF file at ``path`` (memory-mapped); clear errors for a missing or damaged file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises various exception types on malformed files
        raise ValueError(f"GGUF file {path} is truncated or corrupt: {type(e).__name__}: {e}") from e


def _dequantized(tensor) -> np.ndarray:
    """float32 array shaped ``reversed(tensor.shape)`` (``[out, in]`` for matrices)."""
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _config(meta: dict[str, Any], arch: str, tensors: dict, dtype: str, path: str) -> ModelConfig:
    """ModelConfig from ``<arch>.*`` metadata; tied embeddings when there is no ``output.weight``."""

    def get(key, default=_REQUIRED):
        value = meta.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise ValueError(f"GGUF file {path} lacks metadata {arch}.{key}")
        return value

    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"GGUF file {path}: unsupported RoPE scaling type {get('rope.scaling.type')!r}")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"GGUF file {path} lacks the token list (tokenizer.ggml.tokens)")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    layers, head_dim = int(get("block_count")), int(get("attention.key_length", hidden // heads))
    family = {}
    if arch == "gemma3":
        family = dict(sliding_window=int(get("attention.sliding_window")), sliding_window_pattern=_GEMMA3_PATTERN,
                      rope_local_theta=_GEMMA3_LOCAL_THETA,
                      query_pre_attn_scalar=hidden // heads if layers == _GEMMA3_27B_LAYERS else head_dim)
    config = ModelConfig(
        architecture=arch,
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_embeddings=PARAMS_BY_PATH["lm_head/kernel"].gguf not in tensors,
        dtype=dtype,
        **_ARCHITECTURES[arch][0],
        **family,
    )
    if _ROPE_FREQS not in tensors:
        return config
    rope_freqs = _dequantized(tensors[_ROPE_FREQS])
    # llama.cpp stores Llama-3 scaling only as per-frequency divisors [D/2]; Llama 3.x
    # uses low/high frequency factors 1 and 4 over an 8192-token original context.
    scaling = RopeScaling(
        factor=_f32(rope_freqs.max()),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=int(get("rope.scaling.original_context_length", 8192)),
    )
    config = config.replace(rope_scaling=scaling)
    if not np.allclose(inverse_frequencies(config), inverse_frequencies(config.replace(rope_scaling=None)) / rope_freqs,
                       rtol=1e-4):
        raise ValueError(f"GGUF file {path}: {_ROPE_FREQS} does not match Llama-3 RoPE scaling ({scaling})")
    return config


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, tensors by name)`` of a GGUF file of a supported architecture."""
    reader = open_gguf(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    return meta, {t.name: t for t in reader.tensors}


def _config_and_params(path: str, meta: dict[str, Any], tensors: dict, dtype: str) -> tuple[ModelConfig, dict]:
    arch = meta["general.architecture"]
    config = _config(meta, arch, tensors, dtype, path)
    permuted = _ARCHITECTURES[arch][1]

    def read(param: Param, name: str) -> np.ndarray:
        w = _dequantized(tensors[name])
        if permuted and param.llama_cpp_heads is not None:
            return unpermute_rows(w, param.llama_cpp_heads(config))
        return w

    return config, assemble_params(config, "gguf", read, dtype, source=f"GGUF file {path}")


def load_gguf_params(path: str, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Read a GGUF file's ``(config, params)`` without building its tokenizer (see :func:`load_gguf`)."""
    path = os.fspath(path)
    meta, tensors = read_gguf(path)
    return _config_and_params(path, meta, tensors, dtype)


def load_gguf(path: str, dtype: str = "float32") -> tuple[ModelConfig, dict, Tokenizer, ChatFormat]:
    """Read a GGUF file: ``(config, params, tokenizer, chat_format)``.

    ``params`` is a nested dict of numpy arrays of ``dtype`` laid out as
    ``param_shapes(config)`` (kernels ``[in, out]``, layers stacked ``[L, ...]``,
    ``lm_head`` only when the file has ``output.weight``). Q/K rows of ``llama``
    files are un-permuted so that rotate-half RoPE applies; Gemma files store their
    norm scales with the 1 already added, as the model uses them.
    """
    path = os.fspath(path)
    meta, tensors = read_gguf(path)
    chat_format = ChatFormat.from_metadata(meta.get("tokenizer.chat_template"), meta["general.architecture"])
    tokenizer = Tokenizer.from_gguf_metadata(meta, end_tokens=(chat_format.end_token,))
    chat_format.check_vocabulary(tokenizer)
    config, params = _config_and_params(path, meta, tensors, dtype)
    return config, params, tokenizer, chat_format
