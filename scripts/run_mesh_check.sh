#!/usr/bin/env bash
# Wall time of a reduced main job on 1 device vs a data=2,model=4 mesh of 8 simulated CPU
# devices (a correctness run: simulated devices share the same cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p results
JOB="pipeline --task gsm8k --agents 4 --mode both --limit 3 --max-new-tokens 48"
/usr/bin/time -f "1 device: %e s wall" $PY run.py $JOB --json results/mesh1.json 2>&1 | tail -8 | tee results/mesh1.log
XLA_FLAGS=--xla_force_host_platform_device_count=8 /usr/bin/time -f "8 devices: %e s wall" \
  $PY run.py $JOB --mesh data=2,model=4 --json results/mesh8.json 2>&1 | tail -8 | tee results/mesh8.log
