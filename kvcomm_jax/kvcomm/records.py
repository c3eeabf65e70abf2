"""Per-call records and the reuse / TTFT summaries built from them (docs/design.md §10)."""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics
from typing import Sequence


@dataclasses.dataclass
class CallRecord:
    """One agent call.

    path: the plan (:data:`kvcomm_jax.kvcomm.plans.PATHS`): "dense" (full prefill), "reuse"
      (every placeholder reused) or "partial" (reused up to a placeholder, the rest computed)
    prompt_tokens / reused_tokens: prompt length and how many of its KV entries came from reuse
      (tokens computed in context, the last one included, are not reused)
    recomputed_tokens: tokens a reuse call computed in context (0 for dense)
    ttft_ms: prefill to first token, warm (compilation excluded); breakdown_ms: its parts
      ("prefill" for dense; "correction_assembly" (matching, offsets, re-rotation, assembly and
      a selection rule, one program) and "forward" for a reuse or partial call)
    compile_ms: the call's share of the time its batched part spent compiling new programs (the
      part's time over its rows, so a sum over records counts each compilation once), apart from TTFT
    others_ms: work the call triggers outside its TTFT: base KV and prediction of its
      question/conditions, deltas recorded after a dense prefill, publishing its response
    fidelity: for reuse calls, what the engine's probes measured (e.g. per-layer relative
      KV error vs dense and whether the first token agrees with the dense prefill's)
    reason: when not fully reused, why (the blocking placeholder and its cause)
    """

    request: int
    agent_id: int
    path: str
    prompt_tokens: int
    reused_tokens: int
    ttft_ms: float
    breakdown_ms: dict
    compile_ms: float
    others_ms: float
    first_token: int
    response_ids: list
    text: str
    fidelity: dict | None = None
    reason: str | None = None
    recomputed_tokens: int = 0


def reuse_rate(records: Sequence[CallRecord]) -> float:
    """Fully reused calls / all agent calls (the paper's definition; decision agent included)."""
    return sum(r.path == "reuse" for r in records) / len(records) if records else 0.0


def partial_reuse_rate(records: Sequence[CallRecord]) -> float:
    """Partly reused calls / all agent calls."""
    return sum(r.path == "partial" for r in records) / len(records) if records else 0.0


def token_reuse_rate(records: Sequence[CallRecord]) -> float:
    """Reused prompt tokens (not computed in context) / all prompt tokens."""
    total = sum(r.prompt_tokens for r in records)
    return sum(r.reused_tokens for r in records) / total if total else 0.0


def recomputed_token_rate(records: Sequence[CallRecord]) -> float:
    """Tokens computed in context by reuse calls / those calls' prompt tokens."""
    reusing = [r for r in records if r.path != "dense"]
    total = sum(r.prompt_tokens for r in reusing)
    return sum(r.recomputed_tokens for r in reusing) / total if total else 0.0


def reason_counts(records: Sequence[CallRecord]) -> dict[str, int]:
    """How often each reason kept a call from full reuse, numbers replaced by ``N``, most frequent first."""
    counts = collections.Counter(re.sub(r"\d+", "N", r.reason) for r in records if r.reason)
    return dict(counts.most_common())


def ttft_summary(records: Sequence[CallRecord], agent_ids: Sequence[int]) -> dict:
    """Mean, median and per-agent median TTFT in milliseconds."""
    values = [r.ttft_ms for r in records]
    per_agent = []
    for agent in agent_ids:
        mine = [r.ttft_ms for r in records if r.agent_id == agent]
        per_agent.append(statistics.median(mine) if mine else None)
    return {
        "mean": statistics.fmean(values) if values else None,
        "median": statistics.median(values) if values else None,
        "per_agent": per_agent,
    }
