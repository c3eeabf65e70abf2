#!/usr/bin/env bash
# Runs every measurement recorded in docs/benchmarks.md, one after another (they time
# things, so they should not share the machine), writing results/ and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p results
$PY run.py bench-ttft --agents 5 --prefix-tokens 512 --input-tokens 1024 --output-tokens 512 --samples 5 \
  --json results/bench_ttft.json --plot results/bench_ttft.png 2>&1 | tee results/bench_ttft.log
$PY run.py pipeline --task gsm8k --agents 4 --mode both --limit 20 --max-new-tokens 128 \
  --json results/gsm8k_20.json --plot results/gsm8k_20_ttft.png 2>&1 | tee results/gsm8k_20.log
$PY scripts/fidelity_report.py --from-json results/gsm8k_20.json \
  --json results/fidelity.json --plot results/fidelity.png 2>&1 | tee results/fidelity.log
$PY run.py 2>&1 | tee results/main.log
$PY scripts/bench_model.py 2>&1 | tee results/bench_model.log
bash scripts/run_mesh_check.sh 2>&1 | tee results/mesh_check.log
