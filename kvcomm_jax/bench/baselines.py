"""What a reuse call is measured against, timed on its identical prompt: an engine probe.

:class:`BaselineProbe` is an engine probe (see :class:`~kvcomm_jax.kvcomm.engine.KVCommEngine`):
right after each reuse call, outside its TTFT, it times on the call's very prompt
(``N`` tokens, batch 1):

* **dense**: a prefill of the exact prompt (tokens ``[1, N]``, no bucket padding) into a
  fresh cache, to the first token;
* **dense with prefix caching**: the agent's template prefix 0 (the text before its first
  placeholder, identical in every request, ``q0`` tokens) is cached once per agent and not
  charged; the call prefills the other ``N - q0`` tokens (exact length, positions
  ``q0 ..``) over a copy of that cache, to the first token;
* **the floor** of the reuse call: one warm one-token forward at the reuse call's cache
  length (``N - 1`` valid slots, the call's capacity), plus the time to read once every
  byte that correction and assembly must read (:func:`correction_reads`: bases, template
  prefixes, and the usable anchors with this consumer's deltas).

Both baselines use the smallest cache that holds the prompt (``N`` slots, or prefix 0's
bucket if larger), so attention spans no padding slots. Each model step gets its input
cache (empty, a copy of the cached prefix, a copy of the reuse cache) built before the
clock starts, as a server keeps cache buffers ready; the clock covers the step to the
first token. So the baselines are as cheap as this model code makes them. Every time is
warm: the steps donate their cache, so the first time a shape is seen it is compiled on a
copy, untimed (:func:`~kvcomm_jax.kvcomm.timing.timed_donating`), and that compile time
is reported apart, under ``baseline_compile_ms``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.kvcomm.request import PreparedCall
from kvcomm_jax.kvcomm.reuse import assemble_cache
from kvcomm_jax.kvcomm.runner import ModelRunner
from kvcomm_jax.kvcomm.segments import SegmentKV, fit_tokens
from kvcomm_jax.kvcomm.timing import timed, timed_donating
from kvcomm_jax.model.generation import pad_prompts, prefill
from kvcomm_jax.model.kv_cache import KVCache, init_cache
from kvcomm_jax.scale import sharding


def exact_prompt(ids: Sequence[int], start: int = 0):
    """``ids`` as unpadded prefill inputs at positions ``start, start + 1, ...``.

    Returns ``(tokens [1, T], positions [1, T], num_new [1])`` with ``T = len(ids)``.
    """
    T = len(ids)
    tokens = jnp.asarray([ids], jnp.int32)
    positions = jnp.arange(start, start + T, dtype=jnp.int32)[None]
    return tokens, positions, jnp.asarray([T], jnp.int32)


def copy_tree(tree):
    """A copy of every array in ``tree`` in new buffers (safe to donate), computed before returning."""
    return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


def timed_prefill(runner: ModelRunner, ids: Sequence[int], start: int, cache: KVCache, key, fresh: bool, seen: set):
    """Exact-length prefill of ``ids`` (positions ``start ..``) over ``cache`` to the first token, timed warm.

    ``cache`` (``fresh``: empty) is donated; the clock starts after it is built. ``seen``: the
    signatures already warm (see :func:`~kvcomm_jax.kvcomm.timing.timed_donating`).
    Returns ``(first_token [1], ms, compile_ms)``.
    """
    tokens, positions, num_new = exact_prompt(ids, start)
    model = runner.model

    def step(donated):
        first, _, out = prefill(
            model.params, tokens, positions, num_new, donated, key, model.config, runner.config.sampling, fresh=fresh
        )
        return first, out

    signature = (tokens.shape, cache.keys.shape, str(cache.keys.dtype), fresh)
    (first, _), ms, compile_ms = timed_donating(step, cache, signature, seen)
    return first, ms, compile_ms


def prefix_cache(prefix0: SegmentKV, length: int, capacity: int) -> KVCache:
    """A one-row cache ``[L, 1, H, capacity, D]`` holding the first ``length`` tokens of ``prefix0`` at positions ``0 ..``."""
    return assemble_cache(prefix0, (), jnp.zeros((0,), jnp.int32), length, capacity=capacity)


def correction_reads(engine, call: PreparedCall) -> list[jax.Array]:
    """The arrays the reuse call's correction and assembly must read, gathered into new arrays.

    The template prefixes ``prefix(0..P)``, keys and values ``[L, H, Tp, D]``; per placeholder
    its content's base ``[L, H, Tc, D]`` and, over the ``U`` anchors usable for this consumer
    (the only ones that enter the correction: the engine stacks every pool slot and masks
    the rest), the anchors' base ``[U, L, H, Ta, D]`` and this consumer's deltas over the
    content ``[U, L, H, Tc, D]`` (the first ``Tc`` tokens, which the correction uses) and over
    the following prefix ``[U, L, H, Tp, D]``.
    """
    template_kv = engine.templates.kv(call.agent_id)
    arrays = [template_kv.prefix(0).keys, template_kv.prefix(0).values]
    for i, name in enumerate(call.layout.placeholders):
        content = call.contents[name]
        rows = np.flatnonzero(engine.anchors.usable(name, call.agent_id, len(content.ids)))  # [U]
        pool, tokens = engine.pools[name], content.base.bucket
        deltas = pool.consumers[str(call.agent_id)]
        arrays += [
            content.base.keys, content.base.values, template_kv.prefix(i + 1).keys, template_kv.prefix(i + 1).values,
            pool.keys[rows], pool.values[rows],
            fit_tokens(deltas.placeholder_keys[rows], tokens), fit_tokens(deltas.placeholder_values[rows], tokens),
            deltas.prefix_keys[rows], deltas.prefix_values[rows],
        ]
    return arrays


@jax.jit
def read_all(arrays):
    """The float32 sum of every element of ``arrays``: one program that reads each byte once."""
    return sum(jnp.sum(a, dtype=jnp.float32) for a in arrays)


def reuse_floor(engine, call: PreparedCall, cache: KVCache, key) -> dict:
    """The reuse call's floor on ``cache`` (its row after the call): a one-token forward at ``N - 1`` slots, and the reads.

    The forward is the reuse call's own step (:meth:`~kvcomm_jax.kvcomm.runner.ModelRunner.recompute` of the
    last token) on a copy of its cache made before the clock starts.
    Returns ``{"parts_ms": {"forward", "read"}, "bytes", "compile_ms"}``.
    """
    last = len(call.ids) - 1
    tokens, _, _ = pad_prompts([call.ids])  # [1, T]
    _, _, forward_ms, forward_compile = engine.runner.recompute(tokens, [[last]], [1], copy_tree(cache), key)
    arrays = correction_reads(engine, call)
    _, read_ms, read_compile = timed(lambda: read_all(arrays))
    return {
        "parts_ms": {"forward": forward_ms, "read": read_ms},
        "bytes": sum(a.nbytes for a in arrays),
        "compile_ms": forward_compile + read_compile,
    }


class BaselineProbe:
    """Engine probe: dense, prefix-cached dense and the floor on each reuse call's prompt (see the module docstring).

    Holds each agent's prefix-0 cache, built once per (agent, capacity) and never charged.
    """

    def __init__(self):
        self._prefix_caches: dict[tuple[int, int], tuple[KVCache, int]] = {}
        self._warm: set = set()  # prefill signatures already compiled

    def _cached_prefix(self, engine, call: PreparedCall, capacity: int) -> tuple[KVCache, int]:
        """The agent's prefix 0 in a cache of ``capacity`` slots, and its length ``q0`` (at most ``N - 1``)."""
        key = (call.agent_id, capacity)
        if key not in self._prefix_caches:
            q0 = min(call.layout.prefix(0).length, len(call.ids) - 1)
            cache = prefix_cache(engine.templates.kv(call.agent_id).prefix(0), q0, capacity)
            self._prefix_caches[key] = (sharding.place(jax.block_until_ready(cache), engine.mesh), q0)
        return self._prefix_caches[key]

    def __call__(self, engine, call: PreparedCall, cache: KVCache, first_token, key) -> dict:
        runner, ids = engine.runner, call.ids
        capacity = max(len(ids), engine.templates.kv(call.agent_id).prefix(0).bucket)
        config = runner.model.config
        empty = jax.block_until_ready(sharding.place(init_cache(config, 1, capacity), engine.mesh))
        dense_first, dense_ms, dense_compile = timed_prefill(runner, ids, 0, empty, key, True, self._warm)
        cached, q0 = self._cached_prefix(engine, call, capacity)
        cached_first, cached_ms, cached_compile = timed_prefill(runner, ids[q0:], q0, copy_tree(cached), key, False, self._warm)
        floor = reuse_floor(engine, call, cache, key)
        reuse_first, dense_first, cached_first = (int(t[0]) for t in jax.device_get((first_token, dense_first, cached_first)))
        return {
            "dense_ttft_ms": dense_ms,
            "dense_prefix_cached_ttft_ms": cached_ms,
            "cached_prefix_tokens": q0,
            "floor_ms": sum(floor["parts_ms"].values()),
            "floor_parts_ms": floor["parts_ms"],
            "floor_bytes": floor["bytes"],
            "baseline_compile_ms": {"dense": dense_compile, "dense_prefix_cached": cached_compile, "floor": floor["compile_ms"]},
            "dense_first_token": dense_first,
            "prefix_cached_first_token": cached_first,
            "first_token_agrees": reuse_first == dense_first,
        }
