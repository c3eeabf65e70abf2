"""Reuse strategies: how an agent call gets its cache (docs/design.md §9).

A strategy decides, per call, between a dense prefill and reuse; builds the reuse
cache (every prompt token but the last); and learns after a dense call and after
each response. The engine only orchestrates. A new method (a selective-recompute
baseline, a hybrid) is one new class registered in :data:`STRATEGIES`.

* :class:`Dense`: always a dense prefill; no anchors, no base KV.
* :class:`KVComm`: the method: matching + offset correction + re-rotation.
* :class:`RotateOnly`: the same decisions as :class:`KVComm`, but reused KV is only
  re-positioned, never corrected (the ablation).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax.numpy as jnp

from kvcomm_jax.kvcomm.reuse import (
    PlaceholderInputs,
    assemble_cache_batch,
    correct_segments_batch,
)
from kvcomm_jax.kvcomm.segments import segment_difference, stack_rows
from kvcomm_jax.kvcomm.timing import timed

if TYPE_CHECKING:
    from kvcomm_jax.kvcomm.anchor_store import AnchorStore
    from kvcomm_jax.kvcomm.request import Content, PreparedCall
    from kvcomm_jax.kvcomm.runner import ModelRunner
    from kvcomm_jax.kvcomm.template_store import TemplateStore
    from kvcomm_jax.model.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class ReuseContext:
    """What a strategy works with: the engine's anchor store, template store and model runner."""

    anchors: "AnchorStore"
    templates: "TemplateStore"
    runner: "ModelRunner"


@dataclasses.dataclass(frozen=True)
class Decision:
    """Reuse or not; when not, ``reason`` says why (which placeholder, what was missing)."""

    reuse: bool
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class BuiltCache:
    """A reuse cache and what building it cost: warm milliseconds per part, and compile time."""

    cache: "KVCache"
    timings_ms: dict
    compile_ms: float


class Dense:
    """Dense prefill of every call: the baseline, with no reuse machinery at all."""

    name = "dense"
    uses_anchors = False

    def decide(self, ctx: ReuseContext, call: "PreparedCall") -> Decision:
        return Decision(False, "dense mode")

    def build_cache(self, ctx: ReuseContext, calls: Sequence["PreparedCall"], capacity: int) -> BuiltCache:
        raise ValueError("the dense strategy never reuses")

    def after_dense(self, ctx: ReuseContext, call: "PreparedCall", cache: "KVCache", row: int) -> None:
        pass

    def after_response(self, ctx: ReuseContext, name: str, contents: Sequence["Content"]) -> None:
        pass


class KVComm:
    """Reuse when every placeholder's content is shareable and this agent's deltas exist (docs/design.md §6-9)."""

    name = "kvcomm"
    uses_anchors = True
    apply_offsets = True

    def decide(self, ctx: ReuseContext, call: "PreparedCall") -> Decision:
        for name, content in call.contents.items():
            if content.becomes_anchor:
                return Decision(False, f"{{{name}}}: predicted a new anchor")
            if not ctx.anchors.usable(name, call.agent_id, len(content.ids)).any():
                return Decision(False, f"{{{name}}}: no anchor holds agent {call.agent_id}'s deltas and is long enough")
        return Decision(True)

    def build_cache(self, ctx: ReuseContext, calls: Sequence["PreparedCall"], capacity: int) -> BuiltCache:
        """The cache ``[L, B, H, capacity, D]`` of every prompt token but the last, one row per call.

        The calls are one agent's (one template). Two jitted calls for the whole batch:
        matching + offsets for every placeholder, then assembly.
        """
        agent = calls[0].agent_id
        template_kv = ctx.templates.kv(agent)
        placeholders = calls[0].layout.placeholders
        inputs = tuple(
            PlaceholderInputs(
                content=stack_rows([c.contents[name].base for c in calls]),
                prefix=template_kv.prefix(i + 1),
                content_start=jnp.asarray([c.layout.content(i).start for c in calls], jnp.int32),  # [B]
                prefix_start=jnp.asarray([c.layout.prefix(i + 1).start for c in calls], jnp.int32),
                anchors=ctx.anchors.inputs_for(name, agent, [c.contents[name] for c in calls]),
            )
            for i, name in enumerate(placeholders)
        )
        impl = ctx.runner.config.impl
        corrected, matching_ms, compile_matching = timed(
            lambda: correct_segments_batch(inputs, ctx.runner.rope, apply_offsets=self.apply_offsets, impl=impl)
        )
        segments = [segment for pair in corrected for segment in pair]
        starts = jnp.asarray([[span.start for span in c.layout.after_prefix0()] for c in calls], jnp.int32)  # [B, 2P]
        num_cached = jnp.asarray([len(c.ids) - 1 for c in calls], jnp.int32)  # [B]
        cache, assembly_ms, compile_assembly = timed(lambda: assemble_cache_batch(
            template_kv.prefix(0), segments, starts, num_cached, capacity=capacity
        ))
        return BuiltCache(cache, {"matching_offset": matching_ms, "assembly": assembly_ms}, compile_matching + compile_assembly)

    def after_dense(self, ctx: ReuseContext, call: "PreparedCall", cache: "KVCache", row: int) -> None:
        """Store ``real - base`` deviations (from ``row`` of ``cache``) for the contents predicted to be anchors."""
        template_kv = ctx.templates.kv(call.agent_id)
        for i, name in enumerate(call.layout.placeholders):
            content = call.contents[name]
            if not content.becomes_anchor:
                continue
            real_content = ctx.runner.extract(cache, call.layout.content(i), row=row)
            real_prefix = ctx.runner.extract(cache, call.layout.prefix(i + 1), row=row)
            ctx.anchors.store(
                name, content, call.agent_id,
                segment_difference(real_content, content.base),
                segment_difference(real_prefix, template_kv.prefix(i + 1)),
            )

    def after_response(self, ctx: ReuseContext, name: str, contents: Sequence["Content"]) -> None:
        """Published responses (their base KV already set) are predicted like any content."""
        ctx.anchors.observe(name, contents)


class RotateOnly(KVComm):
    """:class:`KVComm`'s decisions, but reused KV is only re-positioned (no offsets)."""

    name = "rotate_only"
    apply_offsets = False


STRATEGIES = {cls.name: cls for cls in (Dense, KVComm, RotateOnly)}
MODES = tuple(STRATEGIES)
