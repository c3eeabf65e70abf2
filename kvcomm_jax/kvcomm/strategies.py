"""Reuse strategies: how an agent call gets its cache (docs/design.md §9 and §12).

A strategy plans each call (:class:`~kvcomm_jax.kvcomm.plans.Plan`: dense, full reuse
or partial reuse, and which tokens are computed in context); gathers the arrays its
reuse cache is built from (:class:`StepInputs`) and names the rule its selection ranks
approximated tokens by (the engine runs both in :func:`~kvcomm_jax.kvcomm.reuse_step.reuse_cache_and_targets`);
and learns after a call and after each response. The engine only orchestrates.
A new method is one new class registered in :data:`STRATEGIES`.

* :class:`Dense`: always a dense prefill; no anchors, no base KV.
* :class:`KVComm`: the method: matching + offset correction + re-rotation; its selection
  rule recomputes the tokens the correction moved most (``score_rule = "correction"``).
* :class:`RotateOnly`: :class:`KVComm`'s plans, but reused KV is only re-positioned,
  never corrected (the ablation); no selection rule.
* :class:`CacheBlend`: every content re-positioned from its own base KV, no anchors, and
  CacheBlend's selection rule (:mod:`kvcomm_jax.kvcomm.cacheblend`, ``score_rule = "first_layers"``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp

from kvcomm_jax.kvcomm.layout import Span
from kvcomm_jax.kvcomm.plans import Plan, plan_call
from kvcomm_jax.kvcomm.reuse import PlaceholderInputs, build_reuse_cache
from kvcomm_jax.kvcomm.segments import SegmentKV, segment_difference, stack_rows

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
class StepInputs:
    """The arrays a batched reuse cache is built from (see :func:`~kvcomm_jax.kvcomm.reuse.build_reuse_cache`).

    placeholders: one :class:`~kvcomm_jax.kvcomm.reuse.PlaceholderInputs` per placeholder, rows on a leading ``B`` axis
    prefix0: the agent's template prefix 0, frame 0 (shared by the rows)
    starts: ``[B, 2P]`` int32, where each segment after prefix 0 begins (prompt order)
    lengths: ``[B]`` int32, the prompt lengths
    """

    placeholders: tuple[PlaceholderInputs, ...]
    prefix0: SegmentKV
    starts: jax.Array
    lengths: jax.Array


class Dense:
    """Dense prefill of every call: the baseline, with no reuse machinery at all."""

    name = "dense"
    uses_anchors = False
    uses_bases = False
    score_rule = None
    default_ratio = 0.0

    def decide(self, ctx: ReuseContext, call: "PreparedCall") -> Plan:
        return Plan("dense", "dense mode")

    def step_inputs(self, ctx: ReuseContext, calls) -> StepInputs:
        raise ValueError("the dense strategy never reuses")

    def record(self, ctx: ReuseContext, call: "PreparedCall", cache: "KVCache", row: int, placeholders) -> None:
        pass

    def after_response(self, ctx: ReuseContext, name: str, contents: Sequence["Content"]) -> None:
        pass


class KVComm:
    """Reuse every placeholder whose content is shareable and has this agent's deltas (docs/design.md §6-9, §12)."""

    name = "kvcomm"
    uses_anchors = True
    uses_bases = True
    score_rule = "correction"
    default_ratio = 0.0
    apply_offsets = True

    def blockers(self, ctx: ReuseContext, call: "PreparedCall") -> list[str | None]:
        """Per placeholder (template order): why it cannot be reused, or None."""
        out = []
        for name in call.layout.placeholders:
            content = call.contents[name]
            if content.becomes_anchor:
                out.append(f"{{{name}}}: predicted a new anchor ({content.anchor_reason})")
            else:
                out.append(ctx.anchors.unusable_reason(name, call.agent_id, len(content.ids)))
        return out

    def uncovered(self, ctx: ReuseContext, call: "PreparedCall", blockers) -> list[Span]:
        """Tokens of reusable contents that no usable anchor covers (only with anchor coverage on)."""
        out = []
        for i, name in enumerate(call.layout.placeholders):
            content = call.layout.content(i)
            if blockers[i] is None:
                covered = ctx.anchors.covered(name, call.agent_id, content.length)
                if covered < content.length:
                    out.append(Span(content.start + covered, content.length - covered))
        return out

    def decide(self, ctx: ReuseContext, call: "PreparedCall") -> Plan:
        config = ctx.runner.config
        blockers = self.blockers(ctx, call)
        return plan_call(
            call.layout, blockers, partial_reuse=config.partial_reuse, exact_question=config.exact_question,
            uncovered=self.uncovered(ctx, call, blockers),
        )

    def step_inputs(self, ctx: ReuseContext, calls: Sequence["PreparedCall"]) -> StepInputs:
        """The arrays the reuse cache of ``calls`` (one agent's, one row each) is built from."""
        agent = calls[0].agent_id
        template_kv = ctx.templates.kv(agent)
        placeholders = tuple(
            PlaceholderInputs(
                content=stack_rows([c.contents[name].base for c in calls], bucket=ctx.anchors.token_capacity(name)),
                prefix=template_kv.prefix(i + 1),
                content_start=jnp.asarray([c.layout.content(i).start for c in calls], jnp.int32),  # [B]
                prefix_start=jnp.asarray([c.layout.prefix(i + 1).start for c in calls], jnp.int32),
                anchors=ctx.anchors.inputs_for(
                    name, agent, [c.contents[name] for c in calls], template_kv.prefix(i + 1).bucket
                ),
            )
            for i, name in enumerate(calls[0].layout.placeholders)
        )
        return StepInputs(
            placeholders,
            template_kv.prefix(0),
            jnp.asarray([[span.start for span in c.layout.after_prefix0()] for c in calls], jnp.int32),  # [B, 2P]
            jnp.asarray([len(c.ids) for c in calls], jnp.int32),  # [B]
        )

    def build_cache(self, ctx: ReuseContext, calls: Sequence["PreparedCall"], capacity: int) -> "KVCache":
        """The reused cache ``[L, B, H, capacity, D]`` of every prompt token of ``calls``, before anything is computed.

        Corrected (or only re-positioned) segments assembled after prefix 0; the reuse step
        builds the same cache inside its program (then a ``"first_layers"`` rule refreshes layers 0-1).
        """
        i = self.step_inputs(ctx, calls)
        cache, _ = build_reuse_cache(
            i.placeholders, ctx.runner.rope, i.prefix0, i.starts, i.lengths, capacity=capacity,
            apply_offsets=self.apply_offsets, impl=ctx.runner.config.impl, mesh=ctx.runner.mesh,
        )
        return cache

    def record(self, ctx: ReuseContext, call: "PreparedCall", cache: "KVCache", row: int, placeholders) -> None:
        """Store ``real - base`` deviations (from ``row`` of ``cache``) for ``placeholders`` whose content is a new anchor.

        ``placeholders``: indices whose content and following prefix ``cache`` holds as
        computed in context (all of them after a dense prefill).
        """
        template_kv = ctx.templates.kv(call.agent_id)
        for i in placeholders:
            name = call.layout.placeholders[i]
            content = call.contents[name]
            if not content.becomes_anchor:
                continue
            real_content = ctx.runner.extract(cache, call.layout.content(i), row=row, width=content.base.bucket)
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
    """:class:`KVComm`'s plans, but reused KV is only re-positioned (no offsets, no selection rule)."""

    name = "rotate_only"
    apply_offsets = False
    score_rule = None


class CacheBlend(KVComm):
    """Every content re-positioned from its own base KV, plus CacheBlend's recomputation (no anchors).

    All placeholders are always reused (so partial reuse never applies); the selection
    scores are the layer-1 value deviations of :func:`~kvcomm_jax.kvcomm.cacheblend.first_layers_deviation`,
    which also puts fresh layer 0-1 KV of every token into the cache.
    """

    name = "cacheblend"
    uses_anchors = False
    apply_offsets = False
    score_rule = "first_layers"
    default_ratio = 0.15

    def blockers(self, ctx: ReuseContext, call: "PreparedCall") -> list[str | None]:
        return [None] * len(call.layout.placeholders)

    def uncovered(self, ctx: ReuseContext, call: "PreparedCall", blockers) -> list[Span]:
        return []

    def record(self, ctx: ReuseContext, call: "PreparedCall", cache: "KVCache", row: int, placeholders) -> None:
        pass

    def after_response(self, ctx: ReuseContext, name: str, contents: Sequence["Content"]) -> None:
        pass


def recompute_ratio(ctx: ReuseContext, strategy) -> float:
    """The fraction of approximated tokens ``strategy`` recomputes under the engine's settings."""
    ratio = ctx.runner.config.recompute_ratio
    return strategy.default_ratio if ratio is None else ratio


STRATEGIES = {cls.name: cls for cls in (Dense, KVComm, RotateOnly, CacheBlend)}
MODES = tuple(STRATEGIES)
