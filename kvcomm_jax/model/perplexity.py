"""Perplexity of a text under a loaded model, from one jitted forward over the whole text.

The text is tokenized (BOS only if the tokenizer adds one), right-padded to a
length bucket so texts in the same bucket share one compiled program, and run
through :func:`model.forward` once. Perplexity is ``exp`` of the mean negative
log-likelihood of each token given the ones before it (``T - 1`` predictions).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.generation import pad_prompts
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.model.transformer import forward


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """perplexity = exp(nll); nll: mean next-token negative log-likelihood in nats over ``tokens - 1`` predictions."""

    perplexity: float
    tokens: int
    nll: float


@functools.partial(jax.jit, static_argnames=("config",))
def mean_nll(params, tokens, positions, num_tokens, config: ModelConfig):
    """Mean next-token NLL (float32 ``[B]``) of ``tokens [B, T]`` whose first ``num_tokens [B]`` are valid."""
    B, T = tokens.shape
    logits, _ = forward(params, tokens, positions, init_cache(config, B, T), config, num_tokens, fresh=True)  # [B, T, V]
    logits = logits[:, :-1]  # position t predicts token t + 1
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    nll = jax.nn.logsumexp(logits, axis=-1) - target  # [B, T-1]
    predicted = jnp.arange(T - 1)[None, :] < (num_tokens - 1)[:, None]  # [B, T-1], padding masked
    return jnp.sum(jnp.where(predicted, nll, 0.0), axis=-1) / (num_tokens - 1)


def perplexity(model: LoadedModel, text: str) -> PerplexityResult:
    """Perplexity of ``text``; ValueError if it has fewer than 2 tokens or exceeds the context limit."""
    ids = model.tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, the text has {len(ids)}")
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise ValueError(f"the text has {len(ids)} tokens, more than the model's context limit of {limit} tokens")
    tokens, positions, num_tokens = pad_prompts([ids])
    nll = float(mean_nll(model.params, tokens, positions, num_tokens, model.config)[0])
    return PerplexityResult(perplexity=math.exp(nll), tokens=len(ids), nll=nll)
