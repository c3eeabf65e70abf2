"""Multi-agent pipelines on benchmark tasks, run dense and with KVCOMM side by side.

``run_pipeline`` builds one engine per mode over the same agent graph and task,
runs every question through each mode (interleaved, so both see the same
machine conditions), and summarizes accuracy, reuse, TTFT and agreement with
dense.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Sequence

from tqdm import tqdm

from kvcomm_jax.agents.graphs import AgentGraph
from kvcomm_jax.agents.tasks import Example, Task
from kvcomm_jax.bench.fidelity import kv_fidelity
from kvcomm_jax.kvcomm.engine import MODES, EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.persistence import load_pools, model_fingerprint, save_pools
from kvcomm_jax.kvcomm.records import (
    CallRecord,
    reuse_rate,
    token_reuse_rate,
    ttft_summary,
)
from kvcomm_jax.kvcomm.templates import AgentPrompt, condition_placeholder
from kvcomm_jax.model.registry import LoadedModel

MODE_CHOICES = {**{mode: (mode,) for mode in MODES}, "both": ("dense", "kvcomm"), "all": MODES}


def agent_prompts(task: Task, graph: AgentGraph) -> list[AgentPrompt]:
    """One prompt per agent: the role's system text and the task's user template for its predecessors."""
    prompts = []
    for node in graph.nodes:
        predecessors = [
            (pid, graph.node(pid).role, task.produces_condition(graph.node(pid).role)) for pid in graph.predecessors(node.agent_id)
        ]
        prompts.append(AgentPrompt(node.agent_id, task.system_prompt(node.role), task.user_template(node.role, predecessors)))
    return prompts


@dataclasses.dataclass
class QuestionResult:
    """One question in one mode: the decision agent's text, its score, and every call's record."""

    example_id: str
    final_text: str
    answer: str | None
    correct: bool
    records: list[CallRecord]


def run_question(engine: KVCommEngine, task: Task, graph: AgentGraph, example: Example) -> QuestionResult:
    """Run every agent in topological order; code roles' results become conditions for their receivers."""
    request = engine.new_request(task.question_text(example))
    for agent_id in graph.topological_order():
        record = engine.run_agent(request, agent_id)
        role = graph.node(agent_id).role
        if task.produces_condition(role) and condition_placeholder(agent_id) in engine.consumers:
            engine.set_condition(request, agent_id, task.condition_text(role, record.text, example))
    final = request.response_text(graph.decision_id) or ""
    return QuestionResult(example.example_id, final, task.extract_answer(final), task.is_correct(example, final), request.records)


def _mean(values):
    return statistics.fmean(values) if values else None


def summarize(results: dict[str, list[QuestionResult]], agent_ids: Sequence[int]) -> dict:
    """Per-mode accuracy / reuse / TTFT, and agreement of each non-dense mode with dense."""
    modes = {}
    for mode, rows in results.items():
        records = [r for row in rows for r in row.records]
        modes[mode] = {
            "accuracy": _mean([float(row.correct) for row in rows]),
            "reuse_rate": reuse_rate(records),
            "token_reuse_rate": token_reuse_rate(records),
            "ttft_ms": ttft_summary(records, agent_ids),
            "calls": len(records),
            "compile_s": sum(r.compile_ms for r in records) / 1e3,  # excluded from the TTFTs above
            "correct": [row.correct for row in rows],
        }
    agreement = {}
    if "dense" in results:
        for mode, rows in results.items():
            if mode == "dense":
                continue
            fidelity = [r.fidelity for row in rows for r in row.records if r.fidelity is not None]
            agreement[mode] = {
                "final_answer": _mean([float(a.answer == d.answer) for a, d in zip(rows, results["dense"])]),
                # reuse calls whose first token equals a dense prefill's on the same prompt
                "first_token": _mean([float(f["first_token_agrees"]) for f in fidelity]),
                "first_token_calls": len(fidelity),
            }
    return {"modes": modes, "agreement": agreement}


def run_pipeline(
    model: LoadedModel,
    task: Task,
    graph: AgentGraph,
    examples: Sequence[Example],
    modes: Sequence[str],
    config: EngineConfig,
    progress: bool = True,
    measure_fidelity: bool = True,
    mesh=None,
    load_pool: str | None = None,
    save_pool: str | None = None,
) -> tuple[dict, dict[str, list[QuestionResult]]]:
    """Run ``examples`` through ``graph`` in each mode. Returns ``(summary, results per mode)``.

    ``measure_fidelity``: run :func:`~kvcomm_jax.bench.fidelity.kv_fidelity` on every reuse call
    (a dense prefill of the same prompt, outside the call's TTFT).
    ``load_pool`` / ``save_pool``: a folder holding one anchor-pool checkpoint per
    non-dense mode (``<folder>/<mode>``), restored before the first question and saved
    after the last, so a later job can warm-start from this one's anchors.
    """
    prompts = agent_prompts(task, graph)
    probes = (kv_fidelity,) if measure_fidelity else ()
    engines = {
        mode: KVCommEngine(
            model, prompts, dataclasses.replace(config, mode=mode, lead_in=task.context_lead_in), mesh=mesh, probes=probes
        )
        for mode in modes
    }
    fingerprint = model_fingerprint(model.config)
    if load_pool:
        for mode, engine in engines.items():
            if engine.strategy.uses_anchors:
                engine.set_pools(load_pools(os.path.join(load_pool, mode), fingerprint, shardings=mesh))
    results: dict[str, list[QuestionResult]] = {mode: [] for mode in modes}
    for example in tqdm(examples, desc=f"{task.name} ({'+'.join(modes)})", unit="question", disable=not progress):
        for mode, engine in engines.items():
            results[mode].append(run_question(engine, task, graph, example))
    if save_pool:
        for mode, engine in engines.items():
            if engine.strategy.uses_anchors:
                save_pools(os.path.join(save_pool, mode), engine.pools, fingerprint)
    return summarize(results, graph.topological_order()), results
