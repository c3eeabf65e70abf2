"""The fidelity study (docs/fidelity.md): reuse plans against dense and the bfloat16 noise reference.

Runs each plan of ``--plans`` (names from ``kvcomm_jax.bench.study.PLANS``) on the same
questions, prints one table row per plan and writes JSON and a cost-vs-agreement plot:

    .venv/bin/python scripts/fidelity_study.py --limit 24 --json docs/results/study.json --plot docs/results/study.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvcomm_jax.agents.graphs import make_graph  # noqa: E402
from kvcomm_jax.agents.pipeline import summarize  # noqa: E402
from kvcomm_jax.agents.tasks import TASKS, get_task  # noqa: E402
from kvcomm_jax.bench.reporting import check_writable, run_info, write_json  # noqa: E402
from kvcomm_jax.bench.study import (  # noqa: E402
    PLANS,
    check_plans,
    plot_study,
    run_study,
    selection_table,
    study_table,
)
from kvcomm_jax.kvcomm.config import EngineConfig  # noqa: E402
from kvcomm_jax.model.registry import DEFAULT_MODEL, load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="gsm8k", choices=tuple(TASKS))
    parser.add_argument("--agents", type=int, default=4, help="agents including the decision agent")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--gamma", type=float, default=0.3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fidelity-tokens", type=int, default=32)
    parser.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated (known: {','.join(PLANS)})")
    parser.add_argument("--warmup", type=int, default=0,
                        help="also summarize the questions after the first WARMUP apart (the pools' steady state)")
    parser.add_argument("--compare-selection", action="store_true",
                        help="in kvcomm plans with a recompute ratio, compare selection rules on the same calls and budget")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    plans = tuple(p.strip() for p in args.plans.split(","))
    check_plans(plans)
    for value, name in ((args.limit, "--limit"), (args.batch_size, "--batch-size"), (args.fidelity_tokens, "--fidelity-tokens")):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")

    task = get_task(args.task)
    graph = make_graph("full_connected", args.agents, task.worker_roles, task.decision_role)
    examples = task.load(limit=args.limit, offset=args.offset)
    model = load_model(args.model)
    start = time.perf_counter()
    order = graph.topological_order()

    def save(results: dict) -> tuple[dict, dict | None]:
        """Summarize the plans run so far (and their steady state) and write the JSON when asked."""
        summary = summarize(results, order)
        steady = None
        if 0 < args.warmup < len(examples):
            steady = summarize({name: rows[args.warmup :] for name, rows in results.items()}, order)
        if args.json:
            write_json(args.json, {
                "command": " ".join(sys.argv), **run_info(), "wall_s": time.perf_counter() - start, "task": args.task,
                "model": model.source, "agents": args.agents, "questions": len(examples), "offset": args.offset,
                "gamma": args.gamma, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "fidelity_tokens": args.fidelity_tokens, "plans": {name: PLANS[name] for name in results},
                "complete": len(results) == len(plans), **summary, "warmup": args.warmup, "steady": steady,
                "calls": {
                    name: [{"question": row.example_id, "answer": row.answer, "correct": row.correct,
                            "records": [{k: v for k, v in vars(r).items() if k != "response_ids"} for r in row.records]}
                           for row in rows]
                    for name, rows in results.items()
                },
            })
        return summary, steady

    _, results = run_study(
        model, task, graph, examples, plans, EngineConfig(gamma=args.gamma, max_new_tokens=args.max_new_tokens),
        batch_size=args.batch_size, fidelity_tokens=args.fidelity_tokens, compare_selection=args.compare_selection,
        after_plan=save,
    )
    summary, steady = save(results)
    for title, part in (("all questions", summary), (f"after the first {args.warmup} questions", steady)):
        if part is None:
            continue
        print(f"\n{title}:\n{study_table(part)}")
        selection = selection_table(part)
        if selection:
            print(f"\nselection rules on the same calls and budget ({title}):\n{selection}")
    if args.json:
        print(f"wrote {args.json} (also after each plan)")
    if args.plot:
        plot_study(args.plot, summary, f"{args.task}, {args.agents} agents, {len(examples)} questions: cost vs fidelity")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
