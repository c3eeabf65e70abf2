"""Model hyper-parameters as a frozen dataclass (hashable, so usable as a jit static arg)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder.

    Covers Llama 2/3 (optionally with Llama-3 RoPE scaling), Mistral, Qwen2/2.5
    (``attention_bias``: q/k/v projections carry biases) and Qwen3 (``qk_norm``:
    per-head RMSNorm on queries and keys before RoPE).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def tiny_config(**overrides) -> ModelConfig:
    """A small random-weight configuration for unit tests (seconds to compile on CPU)."""
    base = dict(
        architecture="llama",
        vocab_size=97,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_embeddings=False,
    )
    base.update(overrides)
    return ModelConfig(**base)


def param_shapes(config: ModelConfig) -> dict:
    """Shapes of the params pytree, keyed like the pytree itself.

    Layer weights are stacked on a leading ``L`` axis (the decoder scans over
    layers). Dense kernels are ``[in, out]``.
    """
    c = config
    L, E, F, D = c.num_layers, c.hidden_size, c.intermediate_size, c.head_dim
    q_out, kv_out = c.num_heads * D, c.num_kv_heads * D
    attn = {
        "q_proj": {"kernel": (L, E, q_out)},
        "k_proj": {"kernel": (L, E, kv_out)},
        "v_proj": {"kernel": (L, E, kv_out)},
        "o_proj": {"kernel": (L, q_out, E)},
    }
    if c.attention_bias:
        attn["q_proj"]["bias"] = (L, q_out)
        attn["k_proj"]["bias"] = (L, kv_out)
        attn["v_proj"]["bias"] = (L, kv_out)
    if c.qk_norm:
        attn["q_norm"] = {"scale": (L, D)}
        attn["k_norm"] = {"scale": (L, D)}
    shapes = {
        "embed": {"embedding": (c.vocab_size, E)},
        "layers": {
            "attn_norm": {"scale": (L, E)},
            "attn": attn,
            "mlp_norm": {"scale": (L, E)},
            "mlp": {
                "gate_proj": {"kernel": (L, E, F)},
                "up_proj": {"kernel": (L, E, F)},
                "down_proj": {"kernel": (L, F, E)},
            },
        },
        "final_norm": {"scale": (E,)},
    }
    if not c.tie_embeddings:
        shapes["lm_head"] = {"kernel": (E, c.vocab_size)}
    return shapes


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
