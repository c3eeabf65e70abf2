#!/usr/bin/env bash
# Runs one `run.py` command as N CPU processes on this machine, joined with jax.distributed
# (development and tests of the multi-process path; docs/scale.md).
#
#   scripts/launch_local.sh N [--devices-per-process D] [--port P] -- pipeline --task gsm8k ... --mesh data=8
#
# Every process runs the same command with KVCOMM_COORDINATOR=127.0.0.1:P,
# KVCOMM_NUM_PROCESSES=N and its own KVCOMM_PROCESS_ID, and D simulated CPU devices
# (default 4). Process i's output goes to stdout prefixed with "[i]". The launcher exits
# with the first non-zero exit status, after stopping the others: a dead process must not
# leave the rest waiting for it.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 N [--devices-per-process D] [--port P] -- RUN_PY_ARGS..." >&2; exit 2; }
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
NUM=$1; shift
DEVICES=4
PORT=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --devices-per-process) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || usage; DEVICES=$2; shift 2 ;;
    --port) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || usage; PORT=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ $# -ge 2 && "$1" == "--" ]] || usage
shift
PY=${PYTHON:-.venv/bin/python}
if [[ -z "$PORT" ]]; then
  PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

PIDS=()
stop_all() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((i = 0; i < NUM; i++)); do
  KVCOMM_COORDINATOR=127.0.0.1:$PORT KVCOMM_NUM_PROCESSES=$NUM KVCOMM_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
    $PY run.py "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  PIDS+=($!)
done

STATUS=0
RUNNING=("${PIDS[@]}")
while [[ ${#RUNNING[@]} -gt 0 ]]; do
  sleep 1
  STILL=()
  for pid in "${RUNNING[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then STILL+=("$pid"); continue; fi
    set +e; wait "$pid"; rc=$?; set -e
    if [[ $rc -ne 0 && $STATUS -eq 0 ]]; then
      STATUS=$rc
      echo "launch_local: a process exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  RUNNING=("${STILL[@]+"${STILL[@]}"}")
done
exit $STATUS
