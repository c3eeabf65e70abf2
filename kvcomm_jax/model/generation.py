"""Jitted prefill and decode over explicit KV caches, and a Python ``generate`` around them.

``prefill`` runs the prompt (padded to a length bucket) and samples the first
token; ``decode`` runs the rest of generation as one ``lax.while_loop``. Every
response token that ``decode`` returns has been fed through the model, so the
returned cache holds the KV of the prompt and of the whole response.

Both donate their ``cache`` argument: each step writes its new slots into the
input's buffers in place instead of copying the whole ``[L, B, H, S, D]`` cache.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.kv_cache import KVCache, init_cache
from kvcomm_jax.model.sampling import SamplingConfig, sample_next
from kvcomm_jax.model.transformer import Transformer, forward_last


@functools.partial(jax.jit, static_argnames=("config", "sampling", "fresh"), donate_argnames=("cache",))
def prefill(
    params,
    tokens,
    positions,
    num_new,
    cache: KVCache,
    key,
    config: ModelConfig,
    sampling: SamplingConfig,
    fresh: bool = False,
    targets=None,
):
    """Run ``tokens [B, T]`` (``num_new [B]`` valid per row) and sample the next token.

    ``fresh``: the cache is empty; ``targets [B, T]``: the slots the tokens recompute
    instead of being appended (see :func:`kvcomm_jax.model.transformer.forward`).
    ``cache`` is donated: its buffers become the returned cache's, so the caller must not
    use the cache it passed in again.
    Returns ``(first_token [B] int32, last_logits [B, V] float32, cache)``.
    """
    logits, cache = forward_last(params, tokens, positions, cache, config, num_new, fresh, targets)
    return sample_next(logits, key, sampling), logits, cache


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new_tokens"), donate_argnames=("cache",))
def decode(params, first_token, first_position, cache: KVCache, stop_ids, key, config, sampling, max_new_tokens):
    """Generate up to ``max_new_tokens`` tokens starting from ``first_token [B]`` at ``first_position [B]``.

    Each step feeds one token per unfinished row and samples the next; a row
    finishes when it samples a stop id (``stop_ids [K]``) or has fed
    ``max_new_tokens`` tokens. Stop tokens are neither returned nor fed.

    Returns ``(tokens [B, N] int32, num_tokens [B] int32, cache)``: row ``b``'s
    response is ``tokens[b, :num_tokens[b]]`` and its KV occupies the cache
    slots right after the prompt. ``cache`` is donated (see :func:`prefill`).
    """
    B, N = first_token.shape[0], max_new_tokens
    model = Transformer(config)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)  # [B]

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < N) & ~jnp.all(done)

    def body(state):
        i, buf, count, done, cache, key = state
        key, step_key = jax.random.split(key)
        active = ~done
        tok = buf[:, i]  # [B]
        hidden, cache = model.apply(
            {"params": params}, tok[:, None], (first_position + i)[:, None], cache, active.astype(jnp.int32)
        )
        logits = model.apply({"params": params}, hidden[:, 0], method=Transformer.logits)  # [B, V]
        nxt = sample_next(logits, step_key, sampling)
        count = count + active.astype(jnp.int32)
        slot = jnp.minimum(i + 1, N - 1)  # the last fed token has no slot for its successor
        previous = jax.lax.dynamic_index_in_dim(buf, slot, axis=1, keepdims=False)  # [B]
        keep = ~active | (i + 1 >= N)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, previous, nxt)[:, None], slot, axis=1)
        done = done | (active & ((i + 1 >= N) | is_stop(nxt)))
        return i + 1, buf, count, done, cache, key

    buf = jnp.zeros((B, N), jnp.int32).at[:, 0].set(first_token)
    state = (jnp.int32(0), buf, jnp.zeros((B,), jnp.int32), is_stop(first_token), cache, key)
    _, buf, count, _, cache, _ = jax.lax.while_loop(cond, body, state)
    return buf, count, cache


@dataclasses.dataclass
class GenerationResult:
    """Output of :func:`generate`.

    tokens: one list of response ids per row (stop token excluded)
    cache: KV of prompt + response, ``[L, B, H, S, D]``
    prompt_lengths: prompt tokens per row
    ttft_s: wall seconds from the start of prefill to the first token being ready
    decode_s: wall seconds of the decode loop
    """

    tokens: list[list[int]]
    cache: KVCache
    prompt_lengths: list[int]
    ttft_s: float
    decode_s: float


def check_prompt_lengths(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, config: ModelConfig, names: Sequence[str] | None = None
) -> None:
    """Clear errors for empty prompts and prompts that do not fit in the context window.

    ``names`` label the prompts in the messages (default: "prompt 0", "prompt 1", ...).
    """
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    names = names or [f"prompt {i}" for i in range(len(prompts))]
    for name, p in zip(names, prompts):
        if len(p) == 0:
            raise ValueError(f"{name} is empty: give at least one token")
        if len(p) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(
                f"{name} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"model's context limit of {config.max_position_embeddings} tokens"
            )


def pad_prompts(prompts: Sequence[Sequence[int]], width: int = 0):
    """Right-pad prompts to a length bucket, or to ``width`` when larger: ``(tokens [B, T], positions [B, T], num_new [B])``."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = max(bucket_length(int(lengths.max()), what="prompt"), width)
    tokens = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(lengths)


def generate(
    params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Sequence[int] = (),
) -> GenerationResult:
    """Prefill ``prompts`` (a batch of token-id lists of any lengths) and decode.

    The cache capacity is the bucket of ``longest prompt + max_new_tokens``, so
    prompts whose lengths fall in the same buckets reuse compiled programs.
    """
    check_prompt_lengths(prompts, max_new_tokens, config)
    tokens, positions, lengths = pad_prompts(prompts)
    capacity = bucket_length(tokens.shape[1] + max_new_tokens, what="prompt + max_new_tokens")
    cache = init_cache(config, len(prompts), capacity)
    prefill_key, decode_key = jax.random.split(jax.random.PRNGKey(sampling.seed))
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)

    start = time.perf_counter()
    first, _, cache = prefill(params, tokens, positions, lengths, cache, prefill_key, config, sampling, fresh=True)
    first.block_until_ready()
    ttft = time.perf_counter() - start
    out, counts, cache = decode(params, first, lengths, cache, stop, decode_key, config, sampling, max_new_tokens)
    out.block_until_ready()
    decode_s = time.perf_counter() - start - ttft

    out, counts = np.asarray(out), np.asarray(counts)
    return GenerationResult(
        tokens=[out[b, : counts[b]].tolist() for b in range(len(prompts))],
        cache=cache,
        prompt_lengths=[len(p) for p in prompts],
        ttft_s=ttft,
        decode_s=decode_s,
    )
