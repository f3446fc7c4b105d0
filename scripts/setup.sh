#!/usr/bin/env bash
# Create .venv and install adapter-zoo with its test extras.
# torch: CPU machines get the CPU build (a local wheel when pip knows one, else PyTorch's CPU index);
# machines with an NVIDIA GPU get the default CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# pip, minus this machine's noise about absent local index folders
pip() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v -e '^WARNING: Location' -e 'Running pip as the' || true; }; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch==$TORCH_VERSION"
  elif ! .venv/bin/python -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    pip install -q --no-deps "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install -q -e ".[test]"
.venv/bin/python -c "import torch, transformers, peft; print(f'set up: torch {torch.__version__}, transformers {transformers.__version__}')"
