#!/usr/bin/env bash
# Set up fedpersona in ./.venv: a virtual env, CPU torch where no torch is present, the package and
# its test extra. Safe to run again (it only installs what is missing). Usage: bash scripts/setup.sh
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
echo "fedpersona is set up in $VENV ($("$PY" -c 'import torch, flwr; print(f"torch {torch.__version__}, flwr {flwr.__version__}")'))"
