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
from kvcomm_jax.kvcomm.engine import MODES, EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.persistence import load_pools, model_fingerprint, save_pools
from kvcomm_jax.kvcomm.probes import kv_fidelity
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


def run_questions(engine: KVCommEngine, task: Task, graph: AgentGraph, examples: Sequence[Example]) -> list[QuestionResult]:
    """Run the questions as one batch: each agent, in topological order, runs for all of them in one step.

    Code roles' results become conditions for their receivers.
    """
    requests = [engine.new_request(task.question_text(example)) for example in examples]
    for agent_id in graph.topological_order():
        records = engine.run_agents(requests, agent_id)
        role = graph.node(agent_id).role
        if task.produces_condition(role) and condition_placeholder(agent_id) in engine.consumers:
            for request, record, example in zip(requests, records, examples):
                engine.set_condition(request, agent_id, task.condition_text(role, record.text, example))
    results = []
    for request, example in zip(requests, examples):
        final = request.response_text(graph.decision_id) or ""
        correct = task.is_correct(example, final)
        results.append(QuestionResult(example.example_id, final, task.extract_answer(final), correct, request.records))
    return results


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
    batch_size: int = 1,
    mesh=None,
    load_pool: str | None = None,
    save_pool: str | None = None,
) -> tuple[dict, dict[str, list[QuestionResult]]]:
    """Run ``examples`` through ``graph`` in each mode. Returns ``(summary, results per mode)``.

    ``batch_size``: questions run together, each agent's calls for them as one batched step
    (see :meth:`~kvcomm_jax.kvcomm.engine.KVCommEngine.run_agents`).
    ``measure_fidelity``: run :func:`~kvcomm_jax.kvcomm.probes.kv_fidelity` on every reuse call
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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: dict[str, list[QuestionResult]] = {mode: [] for mode in modes}
    with tqdm(total=len(examples), desc=f"{task.name} ({'+'.join(modes)})", unit="question", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            for mode, engine in engines.items():
                results[mode].extend(run_questions(engine, task, graph, batch))
            bar.update(len(batch))
    if save_pool:
        for mode, engine in engines.items():
            if engine.strategy.uses_anchors:
                save_pools(os.path.join(save_pool, mode), engine.pools, fingerprint)
    return summarize(results, graph.topological_order()), results
