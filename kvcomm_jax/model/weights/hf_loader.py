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
from kvcomm_jax.model.config import GEMMA3_FLAGS, ModelConfig, RopeScaling
from kvcomm_jax.model.params import PARAMS_BY_PATH, Param
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.model.weights import assemble_params

# model_type -> (ModelConfig architecture, ModelConfig flags)
_MODEL_TYPES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"attention_bias": True}),
    "qwen3": ("qwen3", {"qk_norm": True}),
    "gemma3_text": ("gemma3", GEMMA3_FLAGS),
}
SUPPORTED_HF_MODEL_TYPES = tuple(_MODEL_TYPES)
# Architectures whose RMSNorm computes x * (1 + w): their checkpoints store the scales minus 1.
_NORMS_MINUS_ONE = ("gemma3",)


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


def _sliding_window_pattern(cfg: Mapping) -> int | None:
    """Gemma's period of global layers: from ``layer_types`` (which must follow one) or ``sliding_window_pattern``."""
    types = cfg.get("layer_types")
    if types is None:
        return cfg.get("sliding_window_pattern")
    pattern = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
    periodic = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(types))]
    if list(types) != periodic:
        raise ValueError(f"unsupported layer_types {types}: expected one global layer every few local ones")
    return pattern


def _gemma3_fields(cfg: Mapping, local_rope: Mapping) -> dict:
    """The Gemma 3 fields of a ``gemma3_text`` config (``local_rope``: RoPE parameters of its sliding layers)."""
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported hidden_activation {activation!r} (supported: 'gelu_pytorch_tanh')")
    return dict(
        sliding_window=cfg.get("sliding_window"),
        sliding_window_pattern=_sliding_window_pattern(cfg),
        rope_local_theta=cfg.get("rope_local_base_freq") or local_rope.get("rope_theta"),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
    )


def config_from_hf(cfg: Mapping, tensor_names: set[str], dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a parsed ``config.json``.

    Embeddings are tied when the config says so or ``tensor_names`` lacks ``lm_head.weight``.
    """
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_HF_MODEL_TYPES)})")
    architecture, flags = _MODEL_TYPES[model_type]
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    local_rope = rope.get("sliding_attention", {})
    rope = rope.get("full_attention", rope)  # RoPE parameters per layer type (Gemma 3): the global layers'
    if architecture == "gemma3":
        flags = {**flags, **_gemma3_fields(cfg, local_rope)}
    try:
        heads = cfg["num_attention_heads"]
        return ModelConfig(
            architecture=architecture,
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
            **{"attention_bias": bool(cfg.get("attention_bias", False)), **flags},
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
    Q/K rows are used as stored (HF checkpoints already use rotate-half RoPE); Gemma
    norm scales get their 1 added.
    """
    path = os.fspath(path)
    cfg = _read_json(os.path.join(path, "config.json"))
    if not cfg:
        raise FileNotFoundError(f"no config.json in {path}")
    tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
    chat_format = ChatFormat.from_metadata(_chat_template(path, tokenizer_config), cfg.get("model_type"))
    eos = _eos_ids(cfg, _read_json(os.path.join(path, "generation_config.json")))
    tokenizer = Tokenizer.from_hf_files(
        os.path.join(path, "tokenizer.json"), tokenizer_config, eos_ids=eos, end_tokens=(chat_format.end_token,)
    )
    chat_format.check_vocabulary(tokenizer)
    index = _read_json(os.path.join(path, "model.safetensors.index.json"))
    files = (sorted({os.path.join(path, f) for f in index["weight_map"].values()}) if index
             else sorted(glob.glob(os.path.join(path, "*.safetensors"))))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(safe_open(f, framework="numpy")) for f in files]
        owner = {name: shard for shard in shards for name in shard.keys()}
        config = config_from_hf(cfg, set(owner), dtype)
        plus_one = config.architecture in _NORMS_MINUS_ONE

        def read(param: Param, name: str) -> np.ndarray:
            w = np.asarray(owner[name].get_tensor(name), dtype=np.float32)
            return w + 1.0 if param.norm and plus_one else w

        params = assemble_params(config, "hf", read, dtype, source=f"checkpoint {path}")
    return config, params, tokenizer, chat_format
