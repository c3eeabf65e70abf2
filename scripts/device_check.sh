#!/usr/bin/env bash
# Runs scripts/device_check.py with the repository's virtual environment (override with
# PYTHON=...). Pass --small to check it on a CPU with the Pallas interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" scripts/device_check.py "$@"
