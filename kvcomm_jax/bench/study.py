"""The fidelity study: every reuse plan on the same questions, against dense and the bfloat16 noise reference.

Each plan is a pipeline mode with settings (:data:`PLANS`); :func:`run_study` runs them one
after another on the same questions (dense first), summarizes them together (agreement
with dense, teacher-forced fidelity, reuse by calls and tokens, cost), and
:func:`study_table` / :func:`plot_study` report one row / one point per plan. A plan is as
harmless as a precision change when it disagrees with dense no more than ``dense_bf16``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

from kvcomm_jax.agents.graphs import AgentGraph
from kvcomm_jax.agents.pipeline import QuestionResult, run_pipeline, summarize
from kvcomm_jax.agents.tasks import Example, Task
from kvcomm_jax.bench.reporting import fmt, markdown_table
from kvcomm_jax.kvcomm.config import EngineConfig
from kvcomm_jax.kvcomm.selection_probe import VARIANTS
from kvcomm_jax.model.registry import LoadedModel

PLANS: dict[str, tuple[str, dict]] = {
    "dense": ("dense", {}),
    "dense_bf16": ("dense_bf16", {}),
    "rotate_only": ("rotate_only", {}),
    "rotate_only_paper": ("rotate_only", {"partial_reuse": False}),
    "kvcomm_paper": ("kvcomm", {"partial_reuse": False}),
    "kvcomm_partial": ("kvcomm", {}),
    "kvcomm_exact": ("kvcomm", {"exact_question": True}),
    "kvcomm_exact_r0.05": ("kvcomm", {"exact_question": True, "recompute_ratio": 0.05}),
    "kvcomm_exact_r0.1": ("kvcomm", {"exact_question": True, "recompute_ratio": 0.1}),
    "kvcomm_exact_r0.2": ("kvcomm", {"exact_question": True, "recompute_ratio": 0.2}),
    "kvcomm_exact_coverage": ("kvcomm", {"exact_question": True, "anchor_coverage": True}),
    "cacheblend_0.15": ("cacheblend", {}),
    "cacheblend_exact_0.1": ("cacheblend", {"exact_question": True, "recompute_ratio": 0.1}),
}
"""Plan name -> (pipeline mode, :class:`EngineConfig` settings)."""


def check_plans(names: Sequence[str]) -> None:
    """Clear errors for unknown plan names and a study without its dense reference."""
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        raise ValueError(f"unknown plans {', '.join(unknown)} (known: {', '.join(PLANS)})")
    if "dense" not in names:
        raise ValueError("a study needs the 'dense' plan: agreement is measured against it")


def run_study(
    model: LoadedModel,
    task: Task,
    graph: AgentGraph,
    examples: Sequence[Example],
    plans: Sequence[str],
    config: EngineConfig,
    batch_size: int = 8,
    fidelity_tokens: int = 32,
    progress: bool = True,
    compare_selection: bool = False,
    after_plan: Callable[[dict[str, list[QuestionResult]]], None] | None = None,
) -> tuple[dict, dict[str, list[QuestionResult]]]:
    """Run every plan on ``examples`` (dense first); ``(summary, results per plan)`` as :func:`summarize` gives them.

    ``compare_selection``: compare selection rules on the reuse calls of the ``kvcomm`` plans
    (see :func:`selection_table`). ``after_plan``, when given, is called with the results so far after each plan, so a long
    study can save what it has measured before it ends.

    Each plan's compiled programs are dropped when it ends (``jax.clear_caches``): a plan
    compiles hundreds of programs, every XLA:CPU executable holds memory mappings of its
    own, and a study of many plans in one process would otherwise pass the kernel's limit
    on mappings per process (``vm.max_map_count``), where compilation fails with "Cannot
    allocate memory" however much memory is free.
    """
    check_plans(plans)
    results: dict[str, list[QuestionResult]] = {}
    for name in sorted(plans, key=lambda n: n != "dense"):
        mode, settings = PLANS[name]
        _, rows = run_pipeline(
            model, task, graph, examples, (mode,), dataclasses.replace(config, **settings),
            progress=progress, batch_size=batch_size, fidelity_tokens=fidelity_tokens,
            compare_selection=compare_selection,
        )
        results[name] = rows[mode]
        jax.clear_caches()
        if after_plan is not None:
            after_plan(results)
    return summarize(results, graph.topological_order()), results


def _percent(value) -> str:
    return fmt(None if value is None else value * 100)


def computed_share(mode_summary: dict) -> float:
    """Prompt tokens computed in context (dense prefill or recompute) / all prompt tokens: a plan's cost."""
    return 1.0 - mode_summary["token_reuse_rate"]


def study_table(summary: dict) -> str:
    """One row per plan: reuse by calls (full / partial) and tokens, cost, agreement with dense, fidelity, accuracy, TTFT."""
    rows = []
    for name, m in summary["modes"].items():
        a, f = summary["agreement"].get(name, {}), m["fidelity"]
        rows.append([
            name, _percent(m["reuse_rate"]), _percent(m["partial_reuse_rate"]), _percent(m["token_reuse_rate"]),
            _percent(m["recomputed_token_rate"]), _percent(computed_share(m)), _percent(a.get("final_answer")),
            _percent(f["response_agreement"]), _percent(f["top1_agreement"]), fmt(f["kl"], ".4f"),
            _percent(m["accuracy"]), fmt(m["ttft_ms"]["mean"]),
        ])
    return markdown_table(
        ["plan", "reuse % (full)", "reuse % (partial)", "token reuse %", "recomputed % (reusing calls)",
         "computed % (all calls)", "final answer = dense %", "same response %", "top-1 %", "KL", "accuracy %",
         "TTFT mean ms"],
        rows,
    )


def selection_table(summary: dict) -> str | None:
    """Per plan that compared selection rules, one row per rule: teacher-forced top-1, KL, same response; None if none did."""
    rows = []
    for name, m in summary["modes"].items():
        selection = m.get("selection")
        if not selection:
            continue
        for variant in VARIANTS:
            v = selection[variant]
            rows.append([
                name, variant, str(selection["calls"]), _percent(selection["budget_share"]),
                _percent(v["top1_agreement"]), fmt(v["kl"], ".4f"), _percent(v["response_agreement"]),
            ])
    if not rows:
        return None
    return markdown_table(
        ["plan", "selection", "calls", "budget % of approximated", "top-1 %", "KL", "same response %"], rows
    )


def plot_study(path: str, summary: dict, title: str) -> None:
    """Cost (share of prompt tokens computed) against teacher-forced top-1 agreement and KL, one point per plan.

    The bfloat16 noise reference, when present, is drawn as a horizontal line on both panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "top1_agreement", "teacher-forced top-1 agreement"), (axes[1], "kl", "KL(dense || plan)")):
        for name, m in summary["modes"].items():
            value = m["fidelity"][metric]
            if value is None:
                continue
            if name == "dense_bf16":
                ax.axhline(value, color="gray", linestyle="--", label="dense bfloat16 (noise)")
                continue
            ax.scatter(computed_share(m) * 100, value)
            ax.annotate(name, (computed_share(m) * 100, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("prompt tokens computed (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    if "dense_bf16" in summary["modes"]:
        axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
