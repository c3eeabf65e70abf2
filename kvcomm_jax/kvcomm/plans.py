"""Reuse plans: which prompt tokens a call takes from reuse and which it computes in context.

A plan is decided per call from which placeholders can be reused (docs/design.md §12).
Its recomputed tokens run in one forward over the assembled cache
(:func:`kvcomm_jax.model.transformer.forward` with ``targets``); the last prompt token
is always among them, since its logits give the first response token.

* ``reuse``: every placeholder is reused; only the last token (and tokens a selection
  rule adds, see :func:`add_selected`) is computed.
* ``partial``: placeholders up to the first one that cannot be reused are reused, and
  everything from that placeholder's content on is computed in context.
* ``dense``: a full prefill (all-or-nothing reuse with a blocked placeholder, or no reuse
  at all).

With ``exact_question`` a question that directly follows prefix 0 is computed in
context (an exact prefix, as ordinary prefix caching would have it); the prefix segment
after it is then corrected from the question's anchors when it can be, else computed too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.kvcomm.layout import Layout, Span
from kvcomm_jax.kvcomm.templates import QUESTION
from kvcomm_jax.model.buckets import bucket_length

PATHS = ("dense", "reuse", "partial")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call gets its cache.

    path: one of :data:`PATHS`
    reason: why the call is not fully reused (the blocking placeholder and its cause), else None
    spans: prompt spans computed in context by the reuse forward, ascending (empty for dense)
    exact: placeholders whose content and following prefix are computed in context with
      everything before them exact or reused: after the call, deviations for anchors are
      recorded from them as after a dense prefill
    """

    path: str
    reason: str | None = None
    spans: tuple[Span, ...] = ()
    exact: tuple[int, ...] = ()

    @property
    def reuses(self) -> bool:
        return self.path != "dense"

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens this plan computes before any selection rule adds more."""
        return sum(span.length for span in self.spans)


def plan_call(
    layout: Layout,
    blockers: Sequence[str | None],
    *,
    partial_reuse: bool,
    exact_question: bool,
    uncovered: Sequence[Span] = (),
) -> Plan:
    """The plan of a call whose placeholder ``i`` cannot be reused when ``blockers[i]`` says why (None: it can).

    ``blockers`` follows ``layout.placeholders``. ``uncovered``: tokens of reused contents
    that no anchor covers, computed in context too.
    """
    n, P = layout.length, len(layout.placeholders)
    spans: list[Span] = []
    exact: list[int] = []
    first = 0
    if exact_question and P and layout.placeholders[0] == QUESTION:
        spans.append(layout.content(0))
        if blockers[0] is not None:  # no anchors to correct the prefix after it: compute that too
            spans.append(layout.prefix(1))
            exact.append(0)
        first = 1
    blocked = next((i for i in range(first, P) if blockers[i] is not None), None)
    if blocked is not None and not partial_reuse:
        return Plan("dense", blockers[blocked])
    path, reason = "reuse", None
    if blocked is not None:
        path, reason = "partial", blockers[blocked]
        start = layout.content(blocked).start
        spans.append(Span(start, n - start))
        exact.extend(range(blocked, P))
    spans.extend(uncovered)
    spans = _merged(spans)
    if spans[-1:] and spans[-1].end == n:
        return Plan(path, reason, spans, tuple(exact))
    return Plan(path, reason, _merged([*spans, Span(n - 1, 1)]), tuple(exact))


def _merged(spans: Sequence[Span]) -> tuple[Span, ...]:
    """Ascending, non-overlapping spans with touching ones joined."""
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: s.start):
        if out and span.start <= out[-1].end:
            out[-1] = Span(out[-1].start, max(out[-1].end, span.end) - out[-1].start)
        else:
            out.append(span)
    return tuple(out)


def plan_targets(plans: Sequence[Plan]) -> tuple[np.ndarray, np.ndarray]:
    """The slots each plan computes: ``(targets [B, T], counts [B])``, padding 0.

    ``T`` is 1 when every row computes only its last token (the one-token reuse step),
    else a length bucket.
    """
    rows = [np.concatenate([np.arange(s.start, s.end) for s in plan.spans]) for plan in plans]
    counts = np.array([len(r) for r in rows], np.int32)
    width = 1 if counts.max() == 1 else bucket_length(int(counts.max()), what="recomputed tokens")
    targets = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        targets[b, : len(row)] = row
    return targets, counts


def selection_candidates(plans: Sequence[Plan], prefix0_lengths: Sequence[int], capacity: int) -> np.ndarray:
    """``[B, capacity]`` bool: approximated slots a selection rule may add (after prefix 0, not computed already)."""
    out = np.zeros((len(plans), capacity), bool)
    for b, (plan, start) in enumerate(zip(plans, prefix0_lengths)):
        end = plan.spans[-1].end
        out[b, start:end] = True
        for span in plan.spans:
            out[b, span.start : span.end] = False
    return out


def selection_budget(ratio: float, candidates: np.ndarray) -> np.ndarray:
    """Tokens each row's selection rule adds: ``round(ratio * approximated tokens)``, ``[B]`` int32 (``candidates [B, S]``)."""
    return np.rint(ratio * candidates.sum(axis=1)).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("extra",))
def add_selected(targets, counts, scores, candidates, picks, *, extra: int):
    """Add each row's ``picks[b]`` highest-``scores`` candidate slots to its targets.

    targets ``[B, T]`` (``counts [B]`` valid, ascending); scores ``[B, S]`` float;
    candidates ``[B, S]`` bool; picks ``[B]`` int32 (at most ``extra``, static).
    Returns ``(targets [B, T + extra], counts + picks)``, ascending, padding after.
    """
    S = scores.shape[1]
    ranked = jnp.where(candidates, scores.astype(jnp.float32), -jnp.inf)  # [B, S]
    _, top = jax.lax.top_k(ranked, extra)  # [B, extra], best first
    take = jnp.arange(extra)[None, :] < picks[:, None]  # [B, extra]
    base = jnp.where(jnp.arange(targets.shape[1])[None, :] < counts[:, None], targets, S)  # padding last
    merged = jnp.sort(jnp.concatenate([base, jnp.where(take, top, S)], axis=1), axis=1)  # [B, T + extra]
    new_counts = counts + picks
    valid = jnp.arange(merged.shape[1])[None, :] < new_counts[:, None]
    return jnp.where(valid, merged, 0).astype(jnp.int32), new_counts
