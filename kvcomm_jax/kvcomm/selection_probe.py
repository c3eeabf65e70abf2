"""KVCOMM's token selection against CacheBlend's on the same calls, plans and budget (docs/fidelity.md).

The fidelity study runs each plan as its own pipeline, so after the first agent two plans
see different prompts and different calls. This probe compares selection rules where
nothing else differs: on each reuse call of a KVCOMM engine it rebuilds the call's cache
four ways from the same pools, with the call's own plan (the same tokens computed in
context) and the same budget (``round(r * approximated tokens)`` more tokens per call,
``r`` the engine's recompute ratio), and measures each against the dense path by teacher
forcing (:func:`~kvcomm_jax.kvcomm.probes.teacher_forced`):

* ``kvcomm``: the anchors' correction, the budget spent on the tokens it moved most;
* ``kvcomm_no_selection``: the correction alone, no budget spent (the plan's tokens only);
* ``kvcomm_cacheblend_rule``: the correction, the budget spent by CacheBlend's rule (the
  largest layer-1 value deviations; the rule refreshes layers 0-1 of every token, as it does
  in CacheBlend);
* ``cacheblend``: CacheBlend itself: every content re-positioned from its own KV, no
  anchors, the budget spent by its rule.

The probe rebuilds its caches from the pools as they are after the step, so ``kvcomm``
can differ slightly from the call's own cache when the step recorded new deltas.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Iterable

from kvcomm_jax.kvcomm.plans import selection_budget, selection_candidates
from kvcomm_jax.kvcomm.probes import per_row, teacher_forced, with_capacity
from kvcomm_jax.kvcomm.strategies import CacheBlend, KVComm, recompute_ratio
from kvcomm_jax.model.buckets import bucket_length

VARIANTS = ("kvcomm", "kvcomm_no_selection", "kvcomm_cacheblend_rule", "cacheblend")
METRICS = ("top1_agreement", "kl", "response_agreement")


class CorrectedCacheBlendRule(CacheBlend):
    """KVCOMM's corrected cache with CacheBlend's selection rule: the rules compared on the same cache."""

    name = "kvcomm_cacheblend_rule"
    apply_offsets = True


@dataclasses.dataclass(eq=False)
class SelectionProbe:
    """An engine probe comparing selection rules on each reuse call (see the module docstring).

    tokens: teacher-forced positions ``N``. Each row gets ``selection_budget`` (tokens the
    budget adds), ``approximated_tokens`` and ``selection``: variant -> the metrics of
    :func:`~kvcomm_jax.kvcomm.probes.teacher_forced_metrics`.
    """

    tokens: int = 32
    strategies: dict = dataclasses.field(
        default_factory=lambda: {"kvcomm": KVComm(), "kvcomm_cacheblend_rule": CorrectedCacheBlendRule(),
                                 "cacheblend": CacheBlend()}
    )

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def __call__(self, engine, calls, plans, cache, first, key) -> list[dict]:
        if engine.strategy.name != KVComm.name:
            raise ValueError(f"the selection probe compares against KVCOMM, not the {engine.strategy.name!r} mode")
        ratio = recompute_ratio(engine.context, engine.strategy)
        if ratio <= 0:
            raise ValueError("the selection probe needs a recompute ratio above 0 (the budget it compares)")
        prompts = [c.ids for c in calls]
        built_capacity = max(c.capacity for c in calls)
        need = bucket_length(max(len(ids) for ids in prompts) + self.tokens, what="prompt + fidelity tokens")
        capacity = max(cache.capacity, need)
        candidates = selection_candidates(plans, [c.layout.prefix(0).length for c in calls], built_capacity)  # [B, S]
        approximated, budget = candidates.sum(axis=1), selection_budget(ratio, candidates)  # [B] each
        caches = []
        for variant in VARIANTS:
            strategy = self.strategies["kvcomm" if variant == "kvcomm_no_selection" else variant]
            _, rebuilt, _, _, _ = engine.reuse_prefill(
                calls, plans, built_capacity, key, strategy=strategy, ratio=0.0 if variant == "kvcomm_no_selection" else ratio
            )
            caches.append(with_capacity(rebuilt, capacity))
        _, dense, _, _ = engine.runner.prefill(prompts, capacity, key)
        metrics = teacher_forced(engine.model, engine.model, prompts, dense, caches, self.tokens, engine.runner.stop_ids, key)
        rows = [per_row({name: m[name] for name in METRICS}) for m in metrics]  # per variant, per row
        return [
            {
                "selection_budget": int(budget[row]),
                "approximated_tokens": int(approximated[row]),
                "selection": {variant: rows[v][row] for v, variant in enumerate(VARIANTS)},
            }
            for row in range(len(calls))
        ]


def selection_summary(fidelities: Iterable[dict | None]) -> dict | None:
    """Per variant, the metric means over probed calls whose budget added tokens; None when no call did.

    Also ``calls`` (counted calls) and ``budget_share`` (tokens added / approximated tokens).
    """
    measured = [f for f in fidelities if f and f.get("selection_budget", 0) > 0]
    if not measured:
        return None
    out = {
        variant: {name: statistics.fmean(float(f["selection"][variant][name]) for f in measured) for name in METRICS}
        for variant in VARIANTS
    }
    added, approximated = (sum(f[k] for f in measured) for k in ("selection_budget", "approximated_tokens"))
    return {**out, "calls": len(measured), "budget_share": added / approximated}
