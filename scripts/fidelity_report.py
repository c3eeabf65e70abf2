"""Per-layer KV error of reused caches against dense, KVCOMM vs rotation only, on the real model.

Runs a 3-worker + decision GSM8K pipeline in KVCOMM mode, with every reuse call also
checked against a dense prefill of the same prompt, or reads the JSON that
``run.py pipeline`` wrote (``--from-json``). Prints a table, writes JSON and a plot.

    .venv/bin/python scripts/fidelity_report.py --limit 12 --json results/fidelity.json --plot results/fidelity.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvcomm_jax.agents.graphs import make_graph  # noqa: E402
from kvcomm_jax.agents.pipeline import run_pipeline  # noqa: E402
from kvcomm_jax.agents.tasks import TASKS, get_task  # noqa: E402
from kvcomm_jax.bench.fidelity import aggregate, fidelity_table, plot_fidelity  # noqa: E402
from kvcomm_jax.bench.reporting import check_writable, write_json  # noqa: E402
from kvcomm_jax.kvcomm.engine import EngineConfig  # noqa: E402
from kvcomm_jax.model.registry import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="gsm8k", choices=tuple(TASKS))
    parser.add_argument("--agents", type=int, default=4, help="agents including the decision agent")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--gamma", type=float, default=0.3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--from-json", help="a pipeline JSON (run with fidelity) instead of a new run")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    if args.from_json:
        with open(args.from_json) as f:
            calls = json.load(f)["calls"]
        mode = "kvcomm" if "kvcomm" in calls else next(m for m in calls if m != "dense")
        fidelities = [r["fidelity"] for row in calls[mode] for r in row["records"]]
        questions = len(calls[mode])
    else:
        task = get_task(args.task)
        graph = make_graph("full_connected", args.agents, task.worker_roles, task.decision_role)
        config = EngineConfig(gamma=args.gamma, max_new_tokens=args.max_new_tokens)
        _, results = run_pipeline(load_model(), task, graph, task.load(limit=args.limit), ("kvcomm",), config)
        fidelities = [r.fidelity for row in results["kvcomm"] for r in row.records]
        questions = len(results["kvcomm"])
    summary = aggregate(fidelities)
    print(f"{summary['calls']} reuse calls over {questions} questions; "
          f"first-token agreement with dense {summary['first_token_agreement'] * 100:.1f}%")
    print(fidelity_table(summary))
    if args.json:
        write_json(args.json, {"questions": questions, **summary})
    if args.plot:
        plot_fidelity(args.plot, summary, f"relative KV error vs dense ({summary['calls']} reuse calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
