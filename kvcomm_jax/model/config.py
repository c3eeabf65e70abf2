"""Model hyper-parameters as a frozen dataclass (hashable, so usable as a jit static arg)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


HIDDEN_ACTIVATIONS = ("silu", "gelu_tanh")

# What a Gemma 3 checkpoint implies beyond its hyper-parameters.
GEMMA3_FLAGS = {"qk_norm": True, "post_norms": True, "hidden_activation": "gelu_tanh", "scale_embeddings": True}
# Fields a Gemma 3 config must set (its checkpoints say them, or its conventions do).
_GEMMA3_REQUIRED = ("sliding_window", "sliding_window_pattern", "rope_local_theta")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family or Gemma 3 decoder.

    Covers Llama 2/3 (optionally with Llama-3 RoPE scaling), Mistral, Qwen2/2.5
    (``attention_bias``: q/k/v projections carry biases), Qwen3 (``qk_norm``:
    per-head RMSNorm on queries and keys before RoPE) and Gemma 3 (``GEMMA3_FLAGS``
    plus a sliding window):

    * ``post_norms``: RMSNorm on the attention and MLP outputs before each residual add.
    * ``hidden_activation``: the MLP's gate activation, "silu" (SwiGLU) or "gelu_tanh"
      (tanh-approximated GELU, GeGLU).
    * ``scale_embeddings``: embeddings are multiplied by ``sqrt(hidden_size)`` (in the
      compute dtype).
    * ``query_pre_attn_scalar``: attention scores are scaled by its ``-1/2`` power;
      None means ``head_dim``.
    * ``attn_logit_softcapping`` / ``final_logit_softcapping``: when set to ``c``,
      attention scores / output logits ``s`` become ``c * tanh(s / c)``.
    * ``sliding_window``, ``sliding_window_pattern``: layer ``i`` is *global* when
      ``(i + 1) % sliding_window_pattern == 0`` and *local* otherwise; on a local layer a
      key at position ``p`` is visible to a query at position ``q`` iff
      ``q - sliding_window < p <= q``. Both None: every layer is global.
    * ``rope_local_theta``: RoPE base of the local layers (``rope_theta`` is the global
      layers'); local layers never use ``rope_scaling``. None: ``rope_theta`` everywhere.
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
    post_norms: bool = False
    hidden_activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    rope_local_theta: float | None = None
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
        if self.hidden_activation not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden_activation must be one of {HIDDEN_ACTIVATIONS}, got {self.hidden_activation!r}")
        if self.architecture == "gemma3":
            missing = [name for name in _GEMMA3_REQUIRED if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a gemma3 config needs {', '.join(missing)} (local layers' window and RoPE base)")
        self._check_sliding_window()

    def _check_sliding_window(self):
        if (self.sliding_window is None) != (self.sliding_window_pattern is None):
            raise ValueError("sliding_window and sliding_window_pattern must be set together")
        if self.sliding_window is not None and (self.sliding_window < 1 or self.sliding_window_pattern < 1):
            raise ValueError(
                f"sliding_window ({self.sliding_window}) and sliding_window_pattern "
                f"({self.sliding_window_pattern}) must be positive"
            )
        if self.rope_local_theta is not None and self.sliding_window is None:
            raise ValueError("rope_local_theta needs sliding_window: without it no layer is local")

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends through the sliding window (length ``num_layers``)."""
        pattern = self.sliding_window_pattern
        return tuple(pattern is not None and (i + 1) % pattern != 0 for i in range(self.num_layers))

    @property
    def attention_scale(self) -> float:
        """The factor on the query-key scores: ``1 / sqrt(query_pre_attn_scalar or head_dim)``."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

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
