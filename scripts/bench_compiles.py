"""Compilations as one engine reaches its steady state, window by window, printed as a markdown table.

One engine (pools kept from window to window, as in a long batch job) runs ``--windows``
consecutive windows of ``--window`` GSM8K questions, in batches of ``--batch-size``,
without fidelity probes. Per window: the programs compiled, the seconds spent tracing,
lowering and compiling them, the window's wall time and its reuse. A steady engine
compiles nothing once its pools, capacities and widths have settled
(docs/design.md §9, "Batched steps").

    python scripts/bench_compiles.py [--model tiny|smollm2-135m] [--windows 3] [--window 20] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvcomm_jax.agents.graphs import make_graph  # noqa: E402
from kvcomm_jax.agents.pipeline import agent_prompts, mode_engine, run_questions  # noqa: E402
from kvcomm_jax.agents.tasks import get_task  # noqa: E402
from kvcomm_jax.bench.reporting import markdown_table, run_info  # noqa: E402
from kvcomm_jax.compile_counter import CompileCounter  # noqa: E402
from kvcomm_jax.kvcomm.config import EngineConfig  # noqa: E402
from kvcomm_jax.kvcomm.records import reuse_rate  # noqa: E402
from kvcomm_jax.model.registry import DEFAULT_MODEL, load_model  # noqa: E402
from kvcomm_jax.testing import tiny_loaded_model  # noqa: E402


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a known model, or 'tiny' (random weights)")
    parser.add_argument("--agents", type=_positive, default=4)
    parser.add_argument("--windows", type=_positive, default=3)
    parser.add_argument("--window", type=_positive, default=20, help="questions per window")
    parser.add_argument("--batch-size", type=_positive, default=4)
    parser.add_argument("--max-new-tokens", type=_positive, default=48)
    parser.add_argument("--recompute-ratio", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.agents < 2:
        parser.error("--agents counts the decision agent and must be >= 2")
    if args.batch_size > args.window:
        parser.error(f"--batch-size {args.batch_size} is larger than a window ({args.window} questions)")
    return args


def measure_windows(model, args) -> list[dict]:
    """One row per window: ``{window, questions, compiles, compile_s, wall_s, reuse_rate}``."""
    task = get_task("gsm8k")
    graph = make_graph("full_connected", args.agents, task.worker_roles, task.decision_role, 1)
    config = EngineConfig(max_new_tokens=args.max_new_tokens, exact_question=True, recompute_ratio=args.recompute_ratio,
                          lead_in=task.context_lead_in)
    engine = mode_engine("kvcomm", model, agent_prompts(task, graph), config, None, fidelity_tokens=None)
    examples = task.load(limit=args.windows * args.window)
    rows = []
    for w in range(args.windows):
        window = examples[w * args.window : (w + 1) * args.window]
        start = time.perf_counter()
        with CompileCounter() as counter:
            results = [r for b in range(0, len(window), args.batch_size)
                       for r in run_questions(engine, task, graph, window[b : b + args.batch_size])]
        records = [record for result in results for record in result.records]
        rows.append({"window": w + 1, "questions": len(window), "compiles": counter.count, "compile_s": counter.seconds,
                     "wall_s": time.perf_counter() - start, "reuse_rate": reuse_rate(records)})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    model = tiny_loaded_model() if args.model == "tiny" else load_model(args.model)
    rows = measure_windows(model, args)
    info = run_info()
    print(f"{model.source}, {args.agents} agents, batches of {args.batch_size}, kvcomm with the exact question and "
          f"r = {args.recompute_ratio}; {info['date']}, {info['machine']['processor']} x {info['machine']['cpu_count']}")
    print(markdown_table(
        ["window", "questions", "compiles", "compile s", "wall s", "reuse % (full)"],
        [[r["window"], r["questions"], r["compiles"], f"{r['compile_s']:.1f}", f"{r['wall_s']:.1f}",
          f"{r['reuse_rate'] * 100:.1f}"] for r in rows],
    ))


if __name__ == "__main__":
    main()
