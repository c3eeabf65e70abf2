"""Fidelity of reused caches against dense on the real model: per-layer KV error and teacher-forced agreement.

Runs a 3-worker + decision GSM8K pipeline in each of ``--modes`` (default KVCOMM, rotation
only, and dense in bfloat16 as the precision noise floor), with every reuse call (every
call of ``dense_bf16``) checked against a dense reference on the same prompt, or reads the
JSON that ``run.py pipeline`` wrote (``--from-json``). Prints the per-layer KV errors of the
KVCOMM mode's reuse calls and the teacher-forced agreement per mode, writes JSON and a plot.

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
from kvcomm_jax.bench.fidelity import (  # noqa: E402
    aggregate,
    fidelity_table,
    layer_kind_table,
    plot_fidelity,
    teacher_forced_table,
)
from kvcomm_jax.bench.reporting import check_writable, write_json  # noqa: E402
from kvcomm_jax.kvcomm.engine import EngineConfig  # noqa: E402
from kvcomm_jax.kvcomm.probes import teacher_forced_summary  # noqa: E402
from kvcomm_jax.model.registry import DEFAULT_MODEL, load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="with --from-json: the model the JSON was run with")
    parser.add_argument("--task", default="gsm8k", choices=tuple(TASKS))
    parser.add_argument("--agents", type=int, default=4, help="agents including the decision agent")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--gamma", type=float, default=0.3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--modes", default="kvcomm,rotate_only,dense_bf16", help="comma-separated; KV errors come from kvcomm")
    parser.add_argument("--fidelity-tokens", type=int, default=32, help="teacher-forced tokens per call")
    parser.add_argument("--from-json", help="a pipeline JSON (run with fidelity) instead of a new run")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    model = load_model(args.model)
    if args.from_json:
        with open(args.from_json) as f:
            calls = json.load(f)["calls"]
        fidelities = {mode: [r["fidelity"] for row in rows for r in row["records"]] for mode, rows in calls.items()}
        questions = len(next(iter(calls.values())))
    else:
        task = get_task(args.task)
        graph = make_graph("full_connected", args.agents, task.worker_roles, task.decision_role)
        config = EngineConfig(gamma=args.gamma, max_new_tokens=args.max_new_tokens)
        modes = tuple(args.modes.split(","))
        _, results = run_pipeline(
            model, task, graph, task.load(limit=args.limit), modes, config, fidelity_tokens=args.fidelity_tokens
        )
        fidelities = {mode: [r.fidelity for row in rows for r in row.records] for mode, rows in results.items()}
        questions = len(results[modes[0]])
    summary = aggregate(fidelities["kvcomm" if "kvcomm" in fidelities else next(m for m in fidelities if m != "dense")])
    per_mode = {mode: teacher_forced_summary(f) for mode, f in fidelities.items() if mode != "dense"}
    print(f"{summary['calls']} reuse calls over {questions} questions; "
          f"first-token agreement with dense {summary['first_token_agreement'] * 100:.1f}%")
    local_layers = model.config.local_layers
    print(layer_kind_table(summary, local_layers) if any(local_layers) else fidelity_table(summary))
    print("\nteacher-forced agreement with dense, per mode:")
    print(teacher_forced_table(per_mode))
    if args.json:
        write_json(args.json, {"model": model.source, "questions": questions, "local_layers": list(local_layers), **summary,
                               "teacher_forced": per_mode})
    if args.plot:
        plot_fidelity(args.plot, summary, f"{args.model}: fidelity vs dense ({summary['calls']} reuse calls)", per_mode,
                      local_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
