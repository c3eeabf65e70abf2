"""Side by side: pipeline JSON files of the same job run on different meshes or process counts.

    .venv/bin/python scripts/compare_runs.py docs/results/scale_1dev.json docs/results/scale_8dev.json docs/results/scale_2proc.json

Prints one row per file (processes, devices, mesh, reuse rates, agreement with dense) and
whether its outcome (:func:`kvcomm_jax.bench.reporting.run_outcome`: every call's path,
reason, first token, text and token counts, every mode's rates and agreement) equals the
first file's. Exits 1 when one differs.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvcomm_jax.bench.reporting import fmt, run_outcome


def differences(a, b, path: str = "") -> list[str]:
    """Where two outcomes differ, as paths like ``calls.kvcomm[3][1].text``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="pipeline JSON files (run.py pipeline --json)")
    args = parser.parse_args(argv)
    payloads = []
    for path in args.files:
        with open(path) as f:
            payloads.append(json.load(f))
    first = run_outcome(payloads[0])
    print("| file | processes | devices | mesh | mode | reuse % (calls) | partial % | token reuse % | final answer = dense % | same outcome as the first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    differs = False
    for path, payload in zip(args.files, payloads):
        diff = differences(first, run_outcome(payload))
        differs |= bool(diff)
        same = "yes" if not diff else f"no ({len(diff)} fields, e.g. {diff[0]})"
        for mode, m in payload["modes"].items():
            agreement = (payload.get("agreement") or {}).get(mode, {}).get("final_answer")
            pct = None if agreement is None else 100 * agreement
            print(f"| {path} | {payload.get('processes', 1)} | {payload.get('devices', 1)} | {payload.get('mesh') or '-'} | {mode} "
                  f"| {fmt(100 * m['reuse_rate'])} | {fmt(100 * m['partial_reuse_rate'])} | {fmt(100 * m['token_reuse_rate'])} "
                  f"| {fmt(pct)} | {same} |")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
