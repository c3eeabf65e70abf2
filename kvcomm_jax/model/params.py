"""The parameter table: one row per leaf of the params pytree.

A row holds everything known about a parameter: its path in the pytree, its logical axes
(whose sizes give its shape; the names are those the sharding rules map to mesh axes),
its checkpoint names (Hugging Face safetensors and llama.cpp GGUF), when a config has it,
and how checkpoints store it. ``param_shapes``, ``param_logical_axes``,
``check_param_shapes`` and the checkpoint loaders all read this one table.

Layer leaves (paths under ``layers/``) are stacked on a leading ``L`` axis (the decoder
scans over layers); their checkpoint names hold a ``{layer}`` placeholder. Dense kernels
are ``[in, out]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from kvcomm_jax.model.config import ModelConfig


def axis_sizes(config: ModelConfig) -> dict[str, int]:
    """Size of each logical axis. ``heads``/``kv_heads`` are fused ``heads * head_dim``."""
    c = config
    return {
        "layers": c.num_layers,
        "embed": c.hidden_size,
        "heads": c.num_heads * c.head_dim,
        "kv_heads": c.num_kv_heads * c.head_dim,
        "mlp": c.intermediate_size,
        "vocab": c.vocab_size,
        "head_dim": c.head_dim,
    }


def _always(config: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Param:
    """One leaf of the params pytree.

    path: slash-separated path in the pytree, ``"layers/attn/q_proj/kernel"``.
    axes: logical axis names, one per dimension; the shape is their ``axis_sizes``.
    hf: tensor name in Hugging Face safetensors checkpoints, or a function of the config
      giving it (a family may name the same leaf differently).
    gguf: tensor name in llama.cpp GGUF files.
    present: whether a config has this leaf.
    transpose: checkpoints store it ``[out, in]`` (a linear weight), the pytree ``[in, out]``.
    llama_cpp_heads: for Q/K rows that llama.cpp's converter permutes (rotate-half ->
      interleaved RoPE) in ``llama`` GGUF files, the number of heads of that permutation.
    norm: an RMSNorm scale, used as a plain multiplier (HF Gemma checkpoints store it
      minus 1; their loader adds the 1 back).
    """

    path: str
    axes: tuple[str, ...]
    hf: str | Callable[[ModelConfig], str]
    gguf: str
    present: Callable[[ModelConfig], bool] = _always
    transpose: bool = False
    llama_cpp_heads: Callable[[ModelConfig], int] | None = None
    norm: bool = False

    @property
    def layered(self) -> bool:
        """Stacked over layers: one checkpoint tensor per layer."""
        return self.path.startswith("layers/")

    def shape(self, config: ModelConfig) -> tuple[int, ...]:
        sizes = axis_sizes(config)
        return tuple(sizes[a] for a in self.axes)

    def checkpoint_name(self, checkpoint: str, config: ModelConfig) -> str:
        """The tensor name in a ``"hf"`` or ``"gguf"`` checkpoint of ``config`` (layers: with ``{layer}``)."""
        name = getattr(self, checkpoint)
        return name if isinstance(name, str) else name(config)


_HF = "model.layers.{layer}."
_GGUF = "blk.{layer}."


def _with_bias(c: ModelConfig) -> bool:
    return c.attention_bias


def _with_qk_norm(c: ModelConfig) -> bool:
    return c.qk_norm


def _with_post_norms(c: ModelConfig) -> bool:
    return c.post_norms


def _untied(c: ModelConfig) -> bool:
    return not c.tie_embeddings


def _mlp_norm_hf(c: ModelConfig) -> str:
    """Llama's pre-MLP norm is ``post_attention_layernorm``; Gemma's (whose post-attention norm has that name) is not."""
    return f"{_HF}{'pre_feedforward' if c.post_norms else 'post_attention'}_layernorm.weight"


def _q_heads(c: ModelConfig) -> int:
    return c.num_heads


def _kv_heads(c: ModelConfig) -> int:
    return c.num_kv_heads


def _projection(name: str, gguf: str, out_axis: str, heads=None) -> tuple[Param, Param]:
    """Kernel and bias of attention projection ``name`` (q/k/v_proj) with output axis ``out_axis``."""
    path, hf = f"layers/attn/{name}", f"{_HF}self_attn.{name}"
    return (
        Param(f"{path}/kernel", ("layers", "embed", out_axis), f"{hf}.weight", f"{_GGUF}{gguf}.weight",
              transpose=True, llama_cpp_heads=heads),
        Param(f"{path}/bias", ("layers", out_axis), f"{hf}.bias", f"{_GGUF}{gguf}.bias",
              present=_with_bias, llama_cpp_heads=heads),
    )


def _norm(path: str, axes: tuple[str, ...], hf, gguf: str, present=_always) -> Param:
    return Param(f"{path}/scale", axes, hf, gguf, present=present, norm=True)


def _mlp(name: str, gguf: str, axes: tuple[str, ...]) -> Param:
    return Param(f"layers/mlp/{name}/kernel", axes, f"{_HF}mlp.{name}.weight", f"{_GGUF}{gguf}.weight",
                 transpose=True)


PARAMS: tuple[Param, ...] = (
    Param("embed/embedding", ("vocab", "embed"), "model.embed_tokens.weight", "token_embd.weight"),
    _norm("layers/attn_norm", ("layers", "embed"), f"{_HF}input_layernorm.weight", f"{_GGUF}attn_norm.weight"),
    *_projection("q_proj", "attn_q", "heads", _q_heads),
    *_projection("k_proj", "attn_k", "kv_heads", _kv_heads),
    *_projection("v_proj", "attn_v", "kv_heads"),
    Param("layers/attn/o_proj/kernel", ("layers", "heads", "embed"), f"{_HF}self_attn.o_proj.weight",
          f"{_GGUF}attn_output.weight", transpose=True),
    _norm("layers/attn/q_norm", ("layers", "head_dim"), f"{_HF}self_attn.q_norm.weight", f"{_GGUF}attn_q_norm.weight",
          present=_with_qk_norm),
    _norm("layers/attn/k_norm", ("layers", "head_dim"), f"{_HF}self_attn.k_norm.weight", f"{_GGUF}attn_k_norm.weight",
          present=_with_qk_norm),
    _norm("layers/post_attn_norm", ("layers", "embed"), f"{_HF}post_attention_layernorm.weight",
          f"{_GGUF}post_attention_norm.weight", present=_with_post_norms),
    _norm("layers/mlp_norm", ("layers", "embed"), _mlp_norm_hf, f"{_GGUF}ffn_norm.weight"),
    _mlp("gate_proj", "ffn_gate", ("layers", "embed", "mlp")),
    _mlp("up_proj", "ffn_up", ("layers", "embed", "mlp")),
    _mlp("down_proj", "ffn_down", ("layers", "mlp", "embed")),
    _norm("layers/post_mlp_norm", ("layers", "embed"), f"{_HF}post_feedforward_layernorm.weight",
          f"{_GGUF}post_ffw_norm.weight", present=_with_post_norms),
    _norm("final_norm", ("embed",), "model.norm.weight", "output_norm.weight"),
    Param("lm_head/kernel", ("embed", "vocab"), "lm_head.weight", "output.weight", present=_untied,
          transpose=True),
)
PARAMS_BY_PATH: dict[str, Param] = {p.path: p for p in PARAMS}


def config_params(config: ModelConfig) -> tuple[Param, ...]:
    """The rows of the leaves ``config`` has, in table order."""
    return tuple(p for p in PARAMS if p.present(config))


def params_tree(config: ModelConfig, value: Callable[[Param], object]) -> dict:
    """The params pytree's nested dicts with ``value(row)`` at every leaf ``config`` has."""
    tree: dict = {}
    for p in config_params(config):
        *parents, leaf = p.path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value(p)
    return tree


def param_shapes(config: ModelConfig) -> dict:
    """Shapes of the params pytree (tuples), keyed like the pytree itself."""
    return params_tree(config, lambda p: p.shape(config))


def param_logical_axes(config: ModelConfig) -> dict:
    """Logical axis names of every leaf (tuples of str), structured like ``param_shapes``."""
    return params_tree(config, lambda p: p.axes)


def check_param_shapes(config: ModelConfig, params) -> None:
    """Raise ValueError naming the first parameter whose presence or shape is off."""
    expected = param_shapes(config)

    def walk(exp, got, path):
        if isinstance(exp, dict):
            if not isinstance(got, dict):
                raise ValueError(f"params{path}: expected a dict, got {type(got).__name__}")
            missing = sorted(set(exp) - set(got))
            extra = sorted(set(got) - set(exp))
            if missing or extra:
                raise ValueError(f"params{path}: missing {missing}, unexpected {extra}")
            for k in exp:
                walk(exp[k], got[k], f"{path}[{k!r}]")
        elif tuple(np.shape(got)) != tuple(exp):
            raise ValueError(f"params{path}: expected shape {tuple(exp)}, got {tuple(np.shape(got))}")

    walk(expected, params, "")
