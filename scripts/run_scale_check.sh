#!/usr/bin/env bash
# One pipeline job three ways: 1 device, 1 process with 8 simulated CPU devices, and 2
# processes x 4 devices joined with jax.distributed (scripts/launch_local.sh); then the
# three JSON files side by side (scripts/compare_runs.py), which must have equal outcomes.
# A correctness run: simulated devices share this machine's cores (docs/scale.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-docs/results}
MESH=data=8
JOB=(pipeline --task gsm8k --agents 4 --mode both --limit 8 --batch-size 8 --max-new-tokens 48 --fidelity-tokens 8)
mkdir -p "$OUT"
/usr/bin/time -f "1 device: %e s wall" \
  env XLA_FLAGS=--xla_force_host_platform_device_count=1 $PY run.py "${JOB[@]}" --json "$OUT/scale_1dev.json" | tail -4
/usr/bin/time -f "1 process x 8 devices: %e s wall" \
  env XLA_FLAGS=--xla_force_host_platform_device_count=8 $PY run.py "${JOB[@]}" --mesh $MESH --json "$OUT/scale_8dev.json" | tail -4
/usr/bin/time -f "2 processes x 4 devices: %e s wall" \
  env PYTHON=$PY scripts/launch_local.sh 2 --devices-per-process 4 -- "${JOB[@]}" --mesh $MESH --json "$OUT/scale_2proc.json" | grep -v Gloo | tail -4
$PY scripts/compare_runs.py "$OUT/scale_1dev.json" "$OUT/scale_8dev.json" "$OUT/scale_2proc.json"
