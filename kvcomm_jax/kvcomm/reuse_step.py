"""A batched reuse call as one program: cache, selection, and the forward to the first token.

:func:`reuse_step` runs, for the calls of one agent, everything between reading the
pools and sampling the first tokens in one jitted program:
:func:`~kvcomm_jax.kvcomm.reuse.build_reuse_cache` (matching, offsets, re-rotation and
assembly), a selection rule's scores and :func:`~kvcomm_jax.kvcomm.plans.add_selected`
when a budget adds tokens, and :func:`~kvcomm_jax.model.generation.prefill` over each
row's computed tokens. The cache is born inside the program and the forward updates it
in place: the corrected segments never leave the program, nothing is copied, and the
host reads nothing back until the first tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kvcomm_jax.kvcomm.cacheblend import first_layers_deviation
from kvcomm_jax.kvcomm.plans import add_selected
from kvcomm_jax.kvcomm.reuse import build_reuse_cache
from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.generation import prefill
from kvcomm_jax.model.sampling import SamplingConfig

SCORE_RULES = (None, "correction", "first_layers")
"""What a selection ranks approximated tokens by: nothing, how far the anchors' correction
moved each token, or CacheBlend's layer-1 value deviation (which also refreshes layers 0-1
of every prompt token, see :mod:`~kvcomm_jax.kvcomm.cacheblend`)."""


@functools.partial(
    jax.jit,
    static_argnames=("capacity", "apply_offsets", "score_rule", "extra", "config", "sampling", "impl", "mesh"),
)
def reuse_step(
    params, inputs, rope, prefix0, starts, lengths, tokens, targets, counts, candidates, picks, key, *,
    capacity: int, apply_offsets: bool, score_rule: str | None, extra: int, config: ModelConfig,
    sampling: SamplingConfig, impl: str = "auto", mesh: Mesh | None = None,
):
    """The reuse path of ``B`` calls of one agent, to their first tokens.

    inputs, rope, prefix0, starts ``[B, 2P]``, lengths ``[B]``: as for
      :func:`~kvcomm_jax.kvcomm.reuse.build_reuse_cache` (``lengths`` = prompt lengths)
    tokens: ``[B, T]`` int32 the prompts, right-padded (``T`` at least every prompt length)
    targets ``[B, W]``, counts ``[B]``: the slots each row's plan computes (ascending, the last
      prompt token last; see :func:`~kvcomm_jax.kvcomm.plans.plan_targets`)
    candidates ``[B, capacity]`` bool, picks ``[B]`` int32: the approximated slots a selection
      may add and how many per row; used only when ``extra`` (static, at least ``picks.max()``) > 0
    score_rule: one of :data:`SCORE_RULES`; ``"first_layers"`` refreshes layers 0-1 even when
      nothing is selected

    Returns ``(first_tokens [B], cache [L, B, H, capacity, D])``; row ``b`` computed
    ``counts[b] + picks[b]`` tokens in context (``counts[b]`` when ``extra`` is 0).
    """
    if score_rule not in SCORE_RULES:
        raise ValueError(f"unknown score rule {score_rule!r}; expected one of {SCORE_RULES}")
    cache, scores = build_reuse_cache(
        inputs, rope, prefix0, starts, lengths, capacity=capacity, apply_offsets=apply_offsets, impl=impl, mesh=mesh,
        with_sizes=score_rule == "correction" and extra > 0,
    )
    if score_rule == "first_layers":
        cache, scores = first_layers_deviation(params, tokens, lengths, cache, config)
    if extra > 0:
        if scores is None:
            raise ValueError("a selection budget needs a score rule")
        targets, counts = add_selected(targets, counts, scores, candidates, picks, extra=extra)
    computed = jnp.take_along_axis(tokens, targets, axis=1)  # [B, W + extra]
    first, _, cache = prefill(params, computed, targets, counts, cache, key, config, sampling, targets=targets)
    return first, cache
