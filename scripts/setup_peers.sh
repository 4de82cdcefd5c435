#!/usr/bin/env bash
# Creates (or reuses) .peers/trl: a separate venv with TRL for `lmlab bench grpo`, so lmlab's own
# .venv never carries TRL. torch is installed first the same way setup_env.sh does it (the CPU
# build on a machine without an NVIDIA GPU, so pip does not pull the CUDA packages).
#   ./scripts/setup_peers.sh            then   lmlab bench grpo model=... problems=...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMLAB_PEER_VENV:-$ROOT/.peers/trl}"
PY="${PYTHON:-python3}"
TORCH_CPU_VERSION="${LMLAB_TORCH_CPU_VERSION:-2.13.0}"
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
[ -x "$VENV/bin/python" ] || { echo "[peers] creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=(pip_quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" "torch==$TORCH_CPU_VERSION" 2>/dev/null || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VENV/bin/python" -c 'import trl' >/dev/null 2>&1 || "${PIP[@]}" trl transformers peft accelerate datasets
echo "[peers] TRL $("$VENV/bin/python" -c 'import trl; print(trl.__version__)') in $VENV"
