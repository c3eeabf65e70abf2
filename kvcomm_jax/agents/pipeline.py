"""Multi-agent pipelines on benchmark tasks, run dense and with KVCOMM side by side.

``run_pipeline`` builds one engine per mode over the same agent graph and task,
runs every question through each mode (interleaved, so both see the same
machine conditions), and summarizes accuracy, reuse, TTFT, fidelity against a dense
reference (teacher-forced, :class:`~kvcomm_jax.kvcomm.probes.FidelityProbe`) and agreement
with dense. Mode ``dense_bf16`` runs dense in bfloat16 against float32 dense: the fidelity
that numerical precision alone costs, a floor to read the reuse modes' fidelity against.
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
from kvcomm_jax.kvcomm.probes import FidelityProbe, teacher_forced_summary
from kvcomm_jax.kvcomm.records import (
    CallRecord,
    partial_reuse_rate,
    reason_counts,
    recomputed_token_rate,
    reuse_rate,
    token_reuse_rate,
    ttft_summary,
)
from kvcomm_jax.kvcomm.runner import ModelRunner
from kvcomm_jax.kvcomm.selection_probe import SelectionProbe, selection_summary
from kvcomm_jax.kvcomm.strategies import STRATEGIES, KVComm
from kvcomm_jax.kvcomm.templates import AgentPrompt, condition_placeholder
from kvcomm_jax.model.registry import LoadedModel, with_dtype
from kvcomm_jax.scale import sharding

PIPELINE_MODES = (*MODES, "dense_bf16")
"""The engine's modes, then ``dense_bf16`` (see the module docstring)."""
MODE_CHOICES = {**{mode: (mode,) for mode in PIPELINE_MODES}, "both": ("dense", "kvcomm"), "all": PIPELINE_MODES}


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
    """Per-mode accuracy / reuse / TTFT / teacher-forced fidelity, and agreement of each non-dense mode with dense."""
    modes = {}
    for mode, rows in results.items():
        records = [r for row in rows for r in row.records]
        modes[mode] = {
            "accuracy": _mean([float(row.correct) for row in rows]),
            "reuse_rate": reuse_rate(records),
            "partial_reuse_rate": partial_reuse_rate(records),
            "token_reuse_rate": token_reuse_rate(records),
            "recomputed_token_rate": recomputed_token_rate(records),
            "reasons": reason_counts(records),
            "ttft_ms": ttft_summary(records, agent_ids),
            "calls": len(records),
            "compile_s": sum(r.compile_ms for r in records) / 1e3,  # excluded from the TTFTs above
            "correct": [row.correct for row in rows],
            # means over the calls compared with a dense reference by teacher forcing
            "fidelity": teacher_forced_summary(r.fidelity for r in records),
            # selection rules on the same calls and budget, when compared (None otherwise)
            "selection": selection_summary(r.fidelity for r in records),
        }
    agreement = {}
    if "dense" in results:
        for mode, rows in results.items():
            if mode == "dense":
                continue
            probed = [r.fidelity for row in rows for r in row.records if r.fidelity and "first_token_agrees" in r.fidelity]
            agreement[mode] = {
                "final_answer": _mean([float(a.answer == d.answer) for a, d in zip(rows, results["dense"])]),
                # probed calls (reuse calls; every call of dense_bf16) whose first token equals a dense prefill's
                "first_token": _mean([float(f["first_token_agrees"]) for f in probed]),
                "first_token_calls": len(probed),
                # probed calls whose greedy continuation is the dense reference's (teacher-forced)
                "response": modes[mode]["fidelity"]["response_agreement"],
            }
    return {"modes": modes, "agreement": agreement}


def mode_engine(
    mode: str, model: LoadedModel, prompts, config: EngineConfig, mesh, fidelity_tokens: int | None,
    compare_selection: bool = False,
) -> KVCommEngine:
    """The engine of one pipeline mode; ``fidelity_tokens`` None: no fidelity probe.

    ``dense_bf16`` is the dense strategy over ``model`` cast to bfloat16, every call probed
    against a float32 runner of ``model``. ``compare_selection`` adds the
    :class:`~kvcomm_jax.kvcomm.selection_probe.SelectionProbe` to the ``kvcomm`` mode.
    """
    if mode != "dense_bf16":
        strategy = STRATEGIES[mode]
        config = dataclasses.replace(  # plan settings apply to the modes they mean something in
            config,
            mode=mode,
            recompute_ratio=config.recompute_ratio if strategy.score_rule is not None else None,
            partial_reuse=config.partial_reuse or not strategy.uses_anchors,
        )
        probes = () if fidelity_tokens is None else (FidelityProbe(tokens=fidelity_tokens),)
        if compare_selection and fidelity_tokens is not None and mode == KVComm.name and (config.recompute_ratio or 0) > 0:
            probes += (SelectionProbe(tokens=fidelity_tokens),)
        return KVCommEngine(model, prompts, config, mesh=mesh, probes=probes)
    config = dataclasses.replace(config, mode="dense", recompute_ratio=None, partial_reuse=True)
    probes = ()
    if fidelity_tokens is not None:
        reference = ModelRunner(with_dtype(model, "float32"), config, mesh or sharding.single_device_mesh())
        probes = (FidelityProbe(tokens=fidelity_tokens, kv_errors=False, reference=reference, all_calls=True),)
    return KVCommEngine(with_dtype(model, "bfloat16"), prompts, config, mesh=mesh, probes=probes)


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
    fidelity_tokens: int = 32,
    compare_selection: bool = False,
) -> tuple[dict, dict[str, list[QuestionResult]]]:
    """Run ``examples`` through ``graph`` in each mode (of :data:`PIPELINE_MODES`). Returns ``(summary, results per mode)``.

    ``batch_size``: questions run together, each agent's calls for them as one batched step
    (see :meth:`~kvcomm_jax.kvcomm.engine.KVCommEngine.run_agents`).
    ``measure_fidelity``: compare every reuse call (every call in ``dense_bf16``) with a dense
    reference on the same prompt, outside the call's TTFT
    (:class:`~kvcomm_jax.kvcomm.probes.FidelityProbe`, ``fidelity_tokens`` teacher-forced tokens).
    ``load_pool`` / ``save_pool``: a folder holding one anchor-pool checkpoint per
    non-dense mode (``<folder>/<mode>``), restored before the first question and saved
    after the last, so a later job can warm-start from this one's anchors.
    ``compare_selection``: with fidelity measured, in the ``kvcomm`` mode with a recompute ratio
    above 0, also compare selection rules on every reuse call at that budget
    (:class:`~kvcomm_jax.kvcomm.selection_probe.SelectionProbe`).
    """
    prompts = agent_prompts(task, graph)
    config = dataclasses.replace(config, lead_in=task.context_lead_in)
    engines = {
        mode: mode_engine(mode, model, prompts, config, mesh, fidelity_tokens if measure_fidelity else None, compare_selection)
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
    summary = summarize(results, graph.topological_order())
    for mode, engine in engines.items():
        if engine.strategy.uses_anchors:
            summary["modes"][mode]["pools"] = engine.anchors.stats()
    return summary, results
