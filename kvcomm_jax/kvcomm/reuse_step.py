"""A batched reuse call's cache and computed tokens, as one program.

:func:`reuse_cache_and_targets` runs, for the calls of one agent, everything between
reading the pools and the forward in one jitted program:
:func:`~kvcomm_jax.kvcomm.reuse.build_reuse_cache` (matching, offsets, re-rotation and
assembly), a selection rule's scores and :func:`~kvcomm_jax.kvcomm.plans.add_selected`
when a budget adds tokens. The forward over the computed tokens is a second program over
the donated cache (:meth:`~kvcomm_jax.kvcomm.runner.ModelRunner.recompute`): on XLA's CPU
backend a program holding both copied the whole cache about ten times more (its optimized
HLO, on the tiny model) and ran agent 5 of ``bench-ttft`` about 60 ms slower than the two
programs (docs/benchmarks.md §1).
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh

from kvcomm_jax.kvcomm.cacheblend import first_layers_deviation
from kvcomm_jax.kvcomm.plans import add_selected
from kvcomm_jax.kvcomm.reuse import build_reuse_cache
from kvcomm_jax.model.config import ModelConfig

SCORE_RULES = (None, "correction", "first_layers")
"""What a selection ranks approximated tokens by: nothing, how far the anchors' correction
moved each token, or CacheBlend's layer-1 value deviation (which also refreshes layers 0-1
of every prompt token, see :mod:`~kvcomm_jax.kvcomm.cacheblend`)."""


@functools.partial(jax.jit, static_argnames=("capacity", "apply_offsets", "score_rule", "extra", "config", "impl", "mesh"))
def reuse_cache_and_targets(
    params, inputs, rope, prefix0, starts, lengths, tokens, targets, counts, candidates, picks, *,
    capacity: int, apply_offsets: bool, score_rule: str | None, extra: int, config: ModelConfig,
    impl: str = "auto", mesh: Mesh | None = None,
):
    """The reuse cache of ``B`` calls of one agent, and the slots each row computes in context.

    inputs, rope, prefix0, starts ``[B, 2P]``, lengths ``[B]``: as for
      :func:`~kvcomm_jax.kvcomm.reuse.build_reuse_cache` (``lengths`` = prompt lengths)
    tokens: ``[B, T]`` int32 the prompts, right-padded (read only by the ``"first_layers"`` rule)
    targets ``[B, W]``, counts ``[B]``: the slots each row's plan computes (ascending, the last
      prompt token last; see :func:`~kvcomm_jax.kvcomm.plans.plan_targets`)
    candidates ``[B, capacity]`` bool, picks ``[B]`` int32: the approximated slots a selection
      may add and how many per row; used only when ``extra`` (static, at least ``picks.max()``) > 0
    score_rule: one of :data:`SCORE_RULES`; ``"first_layers"`` refreshes layers 0-1 even when
      nothing is selected

    Returns ``(cache [L, B, H, capacity, D], targets [B, W + extra], counts [B])``.
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
    return cache, targets, counts
