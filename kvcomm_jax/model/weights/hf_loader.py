"""Load Hugging Face checkpoint directories (``config.json`` + ``*.safetensors`` + ``tokenizer.json``)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors import safe_open

from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.config import ModelConfig, RopeScaling
from kvcomm_jax.model.params import PARAMS_BY_PATH, Param
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.model.weights import assemble_params

# model_type -> ModelConfig flags
_MODEL_TYPES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}
SUPPORTED_HF_MODEL_TYPES = tuple(_MODEL_TYPES)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rope_scaling(rope: Mapping) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: 'llama3')")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def config_from_hf(cfg: Mapping, tensor_names: set[str], dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a parsed ``config.json``.

    Embeddings are tied when the config says so or ``tensor_names`` lacks ``lm_head.weight``.
    """
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_HF_MODEL_TYPES)})")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    try:
        heads = cfg["num_attention_heads"]
        return ModelConfig(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) or PARAMS_BY_PATH["lm_head/kernel"].hf not in tensor_names,
            rope_scaling=_rope_scaling(rope),
            dtype=dtype,
            **{"attention_bias": bool(cfg.get("attention_bias", False)), **_MODEL_TYPES[model_type]},
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}") from None


def _chat_template(path: str, tokenizer_config: Mapping) -> str | None:
    """The default chat template: tokenizer_config.json's ``chat_template`` or ``chat_template.jinja``."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return template


def _eos_ids(*configs: Mapping) -> list[int]:
    """``eos_token_id`` entries (an int or a list) of config.json / generation_config.json."""
    ids = []
    for cfg in configs:
        eos = cfg.get("eos_token_id")
        ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ids


def load_hf_dir(path: str, dtype: str = "float32") -> tuple[ModelConfig, dict, Tokenizer, ChatFormat]:
    """Read a Hugging Face checkpoint directory: ``(config, params, tokenizer, chat_format)``.

    Weights come from ``*.safetensors`` (sharded or not; float32, float16 or
    bfloat16); ``params`` is a nested dict of numpy arrays of ``dtype`` laid out
    as ``param_shapes(config)``. HF linear weights ``[out, in]`` are transposed;
    Q/K rows are used as stored (HF checkpoints already use rotate-half RoPE).
    """
    path = os.fspath(path)
    cfg = _read_json(os.path.join(path, "config.json"))
    if not cfg:
        raise FileNotFoundError(f"no config.json in {path}")
    tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
    chat_format = ChatFormat.from_template(_chat_template(path, tokenizer_config))
    eos = _eos_ids(cfg, _read_json(os.path.join(path, "generation_config.json")))
    tokenizer = Tokenizer.from_hf_files(
        os.path.join(path, "tokenizer.json"), tokenizer_config, eos_ids=eos, end_tokens=(chat_format.end_token,)
    )
    index = _read_json(os.path.join(path, "model.safetensors.index.json"))
    files = (sorted({os.path.join(path, f) for f in index["weight_map"].values()}) if index
             else sorted(glob.glob(os.path.join(path, "*.safetensors"))))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(safe_open(f, framework="numpy")) for f in files]
        owner = {name: shard for shard in shards for name in shard.keys()}
        config = config_from_hf(cfg, set(owner), dtype)

        def read(param: Param, name: str) -> np.ndarray:
            return np.asarray(owner[name].get_tensor(name), dtype=np.float32)

        params = assemble_params(config, "hf", read, dtype, source=f"checkpoint {path}")
    return config, params, tokenizer, chat_format
