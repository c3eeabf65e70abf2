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
from typing import TYPE_CHECKING

import jax.numpy as jnp

from kvcomm_jax.kvcomm.reuse import PlaceholderInputs, assemble_cache, correct_segments
from kvcomm_jax.kvcomm.segments import segment_difference
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

    def build_cache(self, ctx: ReuseContext, call: "PreparedCall") -> BuiltCache:
        raise ValueError("the dense strategy never reuses")

    def after_dense(self, ctx: ReuseContext, call: "PreparedCall", cache: "KVCache") -> None:
        pass

    def after_response(self, ctx: ReuseContext, name: str, content: "Content") -> None:
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

    def build_cache(self, ctx: ReuseContext, call: "PreparedCall") -> BuiltCache:
        """The cache of every prompt token but the last (``lengths = len(ids) - 1``).

        Two jitted calls: matching + offsets for every placeholder, then assembly.
        """
        template_kv = ctx.templates.kv(call.agent_id)
        layout = call.layout
        inputs = tuple(
            PlaceholderInputs(
                content=call.contents[name].base,
                prefix=template_kv.prefix(i + 1),
                content_start=jnp.int32(layout.content(i).start),
                prefix_start=jnp.int32(layout.prefix(i + 1).start),
                anchors=ctx.anchors.inputs_for(name, call.agent_id, call.contents[name]),
            )
            for i, name in enumerate(layout.placeholders)
        )
        impl = ctx.runner.config.impl
        corrected, matching_ms, compile_matching = timed(
            lambda: correct_segments(inputs, ctx.runner.rope, apply_offsets=self.apply_offsets, impl=impl)
        )
        segments = [segment for pair in corrected for segment in pair]
        starts = jnp.asarray([span.start for span in layout.after_prefix0()], jnp.int32)
        cache, assembly_ms, compile_assembly = timed(lambda: assemble_cache(
            template_kv.prefix(0), segments, starts, jnp.int32(len(call.ids) - 1), capacity=call.capacity
        ))
        return BuiltCache(cache, {"matching_offset": matching_ms, "assembly": assembly_ms}, compile_matching + compile_assembly)

    def after_dense(self, ctx: ReuseContext, call: "PreparedCall", cache: "KVCache") -> None:
        """Store ``real - base`` deviations for the contents predicted to be anchors."""
        template_kv = ctx.templates.kv(call.agent_id)
        for i, name in enumerate(call.layout.placeholders):
            content = call.contents[name]
            if not content.becomes_anchor:
                continue
            real_content = ctx.runner.extract(cache, call.layout.content(i))
            real_prefix = ctx.runner.extract(cache, call.layout.prefix(i + 1))
            ctx.anchors.store(
                name, content, call.agent_id,
                segment_difference(real_content, content.base),
                segment_difference(real_prefix, template_kv.prefix(i + 1)),
            )

    def after_response(self, ctx: ReuseContext, name: str, content: "Content") -> None:
        """A published response (its base KV already set) is predicted like any content."""
        ctx.anchors.observe(name, content)


class RotateOnly(KVComm):
    """:class:`KVComm`'s decisions, but reused KV is only re-positioned (no offsets)."""

    name = "rotate_only"
    apply_offsets = False


STRATEGIES = {cls.name: cls for cls in (Dense, KVComm, RotateOnly)}
