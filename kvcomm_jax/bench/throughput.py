"""Throughput of a multi-agent task pipeline: questions per second by mode and batch size.

Every (mode, batch size) combination runs the same questions in one process
through :func:`~kvcomm_jax.agents.pipeline.run_pipeline` with ``batch_size=B``
(each agent's calls for ``B`` questions as one batched step), without the
fidelity probe. **Warm-up**: each combination is run twice, each time on a fresh
engine (empty anchor pools) over the same questions; the first pass compiles
every shape the second one meets and is excluded, the second is timed. Both
passes start from the same state and decode greedily, so they take the same
paths: ``timed_compiles`` (compilations during the timed pass) is 0 when the
warm-up covered everything. ``compile_s`` is the tracing, lowering and compiling
time seen during the warm-up pass.

The wall time of a pass covers everything a request costs: engine set-up
(template KV), base KV, prefill or reuse, decoding, publishing, and the sandbox
run of generated code.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from kvcomm_jax.agents.graphs import make_graph
from kvcomm_jax.agents.pipeline import run_pipeline
from kvcomm_jax.agents.tasks import TASKS, Example, Task, get_task
from kvcomm_jax.bench.reporting import fmt_ratio, markdown_table, plot_lines, run_info
from kvcomm_jax.compile_counter import CompileCounter
from kvcomm_jax.kvcomm.engine import MODES, EngineConfig
from kvcomm_jax.model.registry import LoadedModel


@dataclasses.dataclass(frozen=True)
class ThroughputSettings:
    """The task, its first ``limit`` questions from ``offset``, and the combinations to run."""

    task: str = "gsm8k"
    agents: int = 4
    limit: int = 16
    offset: int = 0
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    modes: tuple[str, ...] = ("dense", "kvcomm")
    max_new_tokens: int = 128
    gamma: float = 0.3
    impl: str = "auto"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if self.agents < 2:
            raise ValueError(f"agents counts the decision agent and must be >= 2, got {self.agents}")
        for name in ("limit", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        _check_list("batch sizes", self.batch_sizes)
        _check_list("modes", self.modes)
        if min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if max(self.batch_sizes) > self.limit:
            raise ValueError(f"batch size {max(self.batch_sizes)} is larger than the {self.limit} questions (--limit)")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)} (known: {', '.join(MODES)})")


def _check_list(what: str, values: Sequence) -> None:
    if not values:
        raise ValueError(f"give at least one of the {what}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} repeat: {list(values)}")


def run_combination(
    model: LoadedModel, task: Task, graph, examples: Sequence[Example], mode: str, batch_size: int, config: EngineConfig,
    progress: bool,
) -> dict:
    """One (mode, batch size): a warm-up pass, then the timed pass (see the module docstring)."""

    def one_pass():
        start = time.perf_counter()
        summary, results = run_pipeline(
            model, task, graph, examples, (mode,), config, progress=progress, measure_fidelity=False, batch_size=batch_size
        )
        return summary, results, time.perf_counter() - start

    with CompileCounter() as warmup:
        one_pass()
    with CompileCounter() as timed:
        summary, results, wall_s = one_pass()
    tokens = sum(len(r.response_ids) for row in results[mode] for r in row.records)
    return {
        "mode": mode,
        "batch_size": batch_size,
        "questions": len(examples),
        "wall_s": wall_s,
        "questions_per_s": len(examples) / wall_s,
        "generated_tokens_per_s": tokens / wall_s,
        "generated_tokens": tokens,
        "reuse_rate": summary["modes"][mode]["reuse_rate"],
        "compile_s": warmup.seconds,
        "timed_compiles": timed.count,
    }


def runs_by_mode(runs: Sequence[dict]) -> dict[str, list[dict]]:
    """``{mode: its runs by increasing batch size}``, modes in first-run order."""
    modes = dict.fromkeys(r["mode"] for r in runs)
    return {mode: sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["batch_size"]) for mode in modes}


def speedups(runs: Sequence[dict]) -> dict:
    """Per mode, questions/s of each batch size over that mode's smallest batch size: ``{mode: {"B": ratio}}``."""
    return {
        mode: {str(r["batch_size"]): r["questions_per_s"] / mine[0]["questions_per_s"] for r in mine}
        for mode, mine in runs_by_mode(runs).items()
    }


def run_throughput_benchmark(model: LoadedModel, settings: ThroughputSettings, progress: bool = True) -> dict:
    """Every (mode, batch size) on the same questions; returns the JSON-ready result."""
    task = get_task(settings.task)
    graph = make_graph("full_connected", settings.agents, task.worker_roles, task.decision_role, 1)
    examples = task.load(limit=settings.limit, offset=settings.offset)
    if len(examples) < max(settings.batch_sizes):
        raise ValueError(
            f"batch size {max(settings.batch_sizes)} is larger than the {len(examples)} questions left from offset {settings.offset}"
        )
    config = EngineConfig(gamma=settings.gamma, max_new_tokens=settings.max_new_tokens, impl=settings.impl)
    runs = [
        run_combination(model, task, graph, examples, mode, batch_size, config, progress)
        for batch_size in settings.batch_sizes
        for mode in settings.modes
    ]
    return {
        "runs": runs,
        "speedup_over_batch_size": speedups(runs),
        "baseline_batch_size": min(settings.batch_sizes),
        "question_ids": [e.example_id for e in examples],
        "settings": dataclasses.asdict(settings),
        "model": model.source,
        **run_info(),
    }


def throughput_table(result: dict) -> str:
    """One row per run: mode, batch size, wall time, questions/s, tokens/s, speedup, reuse, compile."""
    rows = [
        [
            r["mode"], r["batch_size"], r["questions"], f"{r['wall_s']:.1f}", f"{r['questions_per_s']:.3f}",
            f"{r['generated_tokens_per_s']:.1f}", fmt_ratio(result["speedup_over_batch_size"][r["mode"]][str(r["batch_size"])]),
            f"{r['reuse_rate'] * 100:.1f}", f"{r['compile_s']:.1f}", r["timed_compiles"],
        ]
        for r in result["runs"]
    ]
    return markdown_table(
        ["mode", "batch", "questions", "wall s", "questions/s", "generated tokens/s",
         f"speedup vs batch {result['baseline_batch_size']}", "reuse %", "warm-up compile s", "compiles in timed pass"],
        rows,
    )


def plot_throughput(path: str, result: dict) -> None:
    """Questions/s against batch size, one line per mode."""
    series = {
        mode: ([r["batch_size"] for r in mine], [r["questions_per_s"] for r in mine])
        for mode, mine in runs_by_mode(result["runs"]).items()
    }
    s = result["settings"]
    plot_lines(path, series, f"{s['task']}, {s['agents']} agents: throughput", "batch size", "questions / s")
