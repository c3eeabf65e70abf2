"""The model steps an engine runs, on its mesh: dense prefill, the reuse forward, decode, segment extraction.

Every step is a jitted pure function of arrays laid out on the engine's mesh
(see :mod:`kvcomm_jax.scale.sharding`); the runner holds the placed params, the
per-layer RoPE tables and the stop ids, picks cache capacities from length
buckets, and times prefills with :func:`~kvcomm_jax.kvcomm.timing.timed`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
from jax.sharding import Mesh

from kvcomm_jax.kvcomm.config import EngineConfig
from kvcomm_jax.kvcomm.layout import Span
from kvcomm_jax.kvcomm.segments import SegmentKV, extract_segment
from kvcomm_jax.kvcomm.timing import timed, timed_donating
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.generation import decode, pad_prompts, prefill
from kvcomm_jax.model.kv_cache import KVCache, init_cache
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.model.rope import rope_tables
from kvcomm_jax.scale import sharding
from kvcomm_jax.scale.distributed import host_values


class ModelRunner:
    """Runs one model's steps for an engine.

    Args:
      model: a :class:`~kvcomm_jax.model.registry.LoadedModel`; its params are laid out on ``mesh``.
      config: the engine's :class:`~kvcomm_jax.kvcomm.config.EngineConfig`.
      mesh: the device mesh (one device: :func:`~kvcomm_jax.scale.sharding.single_device_mesh`).
    """

    def __init__(self, model: LoadedModel, config: EngineConfig, mesh: Mesh):
        self.mesh, self.config = mesh, config
        params = sharding.place(model.params, mesh, sharding.params_shardings(model.config, mesh))
        self.model = dataclasses.replace(model, params=params)
        self.rope = sharding.place(jnp.asarray(rope_tables(model.config)), mesh)  # [L, D/2]
        self._warm: set = set()  # signatures of donating steps already compiled (see timed_donating)
        stop = [] if config.ignore_eos else sorted(model.tokenizer.eos_ids)
        self.stop_ids = sharding.place(jnp.asarray(stop or [-1], jnp.int32), mesh)  # [K]

    def capacity(self, prompt_len: int, segment_buckets: Sequence[int] = ()) -> int:
        """Cache slots for a prompt: room for decoding and for bucket-padded segment reads/writes."""
        extra = max([bucket_length(self.config.max_new_tokens, what="max_new_tokens"), *segment_buckets])
        return bucket_length(bucket_length(prompt_len, what="prompt") + extra, what="prompt + padding")

    def _forward(self, tokens, positions, num_new, cache: KVCache, key, fresh: bool):
        return prefill(
            self.model.params, tokens, positions, num_new, cache, key, self.model.config, self.config.sampling, fresh=fresh
        )

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int, key):
        """Dense prefill of ``B`` prompts, right-padded to one length bucket.

        Returns ``(first_tokens [B], cache [L, B, H, capacity, D], ms, compile_ms)`` (see ``timed``).
        """
        tokens, positions, lengths = pad_prompts(prompts)  # [B, T], [B, T], [B]

        def step():
            cache = sharding.place(init_cache(self.model.config, len(prompts), capacity), self.mesh)
            first, _, cache = self._forward(tokens, positions, lengths, cache, key, fresh=True)
            return first, cache

        (first, cache), ms, compile_ms = timed(step)
        return first, cache, ms, compile_ms

    def recompute(self, tokens, targets, counts, cache: KVCache, key):
        """The reuse call's forward: each row's prompt tokens at slots ``targets [B, W]`` computed in context.

        ``tokens [B, T]``: the prompts, right-padded (e.g. by :func:`~kvcomm_jax.model.generation.pad_prompts`);
        ``cache`` holds every prompt token of its rows (``lengths`` = prompt lengths); the
        ``counts [B]`` first targets of each row (ascending, the last prompt token last) are
        recomputed in one forward (see :func:`kvcomm_jax.model.transformer.forward`), and
        the first response token is sampled after the last. ``cache`` is donated: the forward
        writes into it in place. Returns ``(first_tokens [B], cache, ms, compile_ms)``.
        """
        tokens, targets, counts = (jnp.asarray(a, jnp.int32) for a in (tokens, targets, counts))
        signature = (tokens.shape, targets.shape, cache.keys.shape, str(cache.keys.dtype))

        def step(c):
            computed = jnp.take_along_axis(tokens, targets, axis=1)  # [B, W]
            return prefill(
                self.model.params, computed, targets, counts, c, key, self.model.config, self.config.sampling,
                targets=targets,
            )

        (first, _, cache), ms, compile_ms = timed_donating(step, cache, signature, self._warm)
        return first, cache, ms, compile_ms

    def decode(self, first, prompt_lengths: Sequence[int], cache: KVCache, key) -> tuple[list[list[int]], KVCache]:
        """Decoding after the first tokens ``[B]``: ``(one response id list per row, cache)``; stop tokens excluded."""
        out, count, cache = decode(
            self.model.params, first, jnp.asarray(prompt_lengths, jnp.int32), cache, self.stop_ids, key,
            self.model.config, self.config.sampling, self.config.max_new_tokens,
        )
        out, count = host_values((out, count))  # [B, N], [B]: the one read back of a decode
        return [row[:n].tolist() for row, n in zip(out, count)], cache

    def extract(self, cache: KVCache, span: Span, frame0: bool = True, row: int = 0, width: int = 0) -> SegmentKV:
        """Slots ``span`` of ``row`` as a segment padded to its length bucket, or to ``width`` when that is
        larger (keys de-rotated to frame 0 if asked). The cache must hold ``span.start`` plus that many slots."""
        bucket = max(bucket_length(span.length, what="segment"), width)
        return extract_segment(
            cache, span.start, span.length, self.rope, bucket=bucket, frame0=frame0, impl=self.config.impl,
            mesh=self.mesh, row=row,
        )
