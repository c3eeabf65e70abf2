"""The fidelity study: plans run on the same questions, summarized and plotted together."""

import pytest

from kvcomm_jax.agents.graphs import make_graph
from kvcomm_jax.agents.pipeline import agent_prompts, mode_engine
from kvcomm_jax.agents.tasks import Example, get_task
from kvcomm_jax.bench.study import (
    PLANS,
    check_plans,
    computed_share,
    plot_study,
    run_study,
    selection_table,
    study_table,
)
from kvcomm_jax.kvcomm.config import EngineConfig
from kvcomm_jax.kvcomm.reuse_step import reuse_cache_and_targets
from kvcomm_jax.kvcomm.selection_probe import VARIANTS, SelectionProbe
from kvcomm_jax.testing import tiny_loaded_model

QUESTIONS = (
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Sara had 10 candies and ate 4. How many candies are left?",
)


@pytest.mark.parametrize(
    "plans, message",
    [(("dense", "kvcomm_fast"), "unknown plans kvcomm_fast"), (("kvcomm_partial",), "needs the 'dense' plan")],
)
def test_unknown_plans_and_a_missing_dense_reference_are_refused(plans, message):
    with pytest.raises(ValueError, match=message):
        check_plans(plans)


def test_every_plan_names_a_mode_and_valid_settings():
    for name, (mode, settings) in PLANS.items():
        EngineConfig(mode="dense" if mode == "dense_bf16" else mode, **settings)  # raises on a bad setting


def test_study_runs_each_plan_on_the_same_questions_and_reports_them(tmp_path):
    task = get_task("gsm8k")
    graph = make_graph("full_connected", 2, task.worker_roles, task.decision_role)
    examples = [Example(f"q{i}", q, "8") for i, q in enumerate(QUESTIONS)]
    plans = ("kvcomm_exact_r0.1", "dense", "cacheblend_0.15")
    saved = []
    summary, results = run_study(
        tiny_loaded_model(), task, graph, examples, plans, EngineConfig(max_new_tokens=4),
        batch_size=2, fidelity_tokens=4, progress=False, compare_selection=True,
        after_plan=lambda so_far: saved.append((list(so_far), reuse_cache_and_targets._cache_size())),
    )
    assert list(results) == ["dense", "kvcomm_exact_r0.1", "cacheblend_0.15"]  # dense first
    # each plan saved as it ends, its compiled programs dropped (the reuse plans compile the reuse step)
    assert saved == [(["dense"], 0), (["dense", "kvcomm_exact_r0.1"], 0), (list(results), 0)]
    for name, rows in results.items():
        assert [row.example_id for row in rows] == ["q0", "q1"]
    blend = [r for row in results["cacheblend_0.15"] for r in row.records]
    assert all(r.path == "reuse" and r.recomputed_tokens > 1 for r in blend)  # every call reuses and selects
    assert summary["modes"]["cacheblend_0.15"]["fidelity"]["calls"] == len(blend)
    assert computed_share(summary["modes"]["dense"]) == 1.0
    assert 0 < computed_share(summary["modes"]["cacheblend_0.15"]) < 1
    table = study_table(summary)
    assert all(f"| {name} |" in table for name in plans)
    assert summary["modes"]["cacheblend_0.15"]["selection"] is None  # selection rules compared only in kvcomm plans
    plot = tmp_path / "study.png"
    plot_study(str(plot), summary, "tiny")
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("mode, ratio, probed", [("kvcomm", 0.1, True), ("kvcomm", None, False), ("cacheblend", 0.1, False)])
def test_selection_rules_are_compared_only_in_kvcomm_with_a_budget(mode, ratio, probed):
    task = get_task("gsm8k")
    prompts = agent_prompts(task, make_graph("full_connected", 2, task.worker_roles, task.decision_role))
    engine = mode_engine(mode, tiny_loaded_model(), prompts, EngineConfig(recompute_ratio=ratio), None, 4, compare_selection=True)
    assert any(isinstance(p, SelectionProbe) for p in engine.probes) == probed


def test_selection_table_has_one_row_per_rule_of_each_comparing_plan():
    metrics = {"top1_agreement": 0.9, "kl": 0.01, "response_agreement": 0.5}
    comparing = {"selection": {**{v: metrics for v in VARIANTS}, "calls": 3, "budget_share": 0.1}}
    summary = {"modes": {"dense": {"selection": None}, "kvcomm_exact_r0.1": comparing}}
    table = selection_table(summary).splitlines()
    assert len(table) == 2 + len(VARIANTS)
    assert all(f"| kvcomm_exact_r0.1 | {v} | 3 | 10.0 | 90.0 | 0.0100 | 50.0 |" in table for v in VARIANTS)
    assert selection_table({"modes": {"dense": {"selection": None}}}) is None
