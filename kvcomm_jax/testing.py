"""A tiny random-weight model with the real default tokenizer, for fast tests and examples."""

from __future__ import annotations

from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.registry import LoadedModel, load_model
from kvcomm_jax.model.transformer import init_params


def tiny_loaded_model(seed: int = 0, **config_overrides) -> LoadedModel:
    """A 3-layer random model sharing the default model's tokenizer and chat format."""
    real = load_model()
    overrides = dict(vocab_size=real.config.vocab_size, max_position_embeddings=4096)
    overrides.update(config_overrides)
    config = tiny_config(**overrides)
    return LoadedModel(config, init_params(config, seed), real.tokenizer, real.chat_format, source=f"tiny-random-{seed}")
