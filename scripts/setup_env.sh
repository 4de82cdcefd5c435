#!/usr/bin/env bash
# Creates or reuses .venv and installs lmlab into it. Sourced by speedrun.sh and test.sh.
#
# torch comes first and explicitly: on a machine without an NVIDIA GPU we install the CPU
# build (torch==2.13.0 resolves to a local CPU wheel on our machines; elsewhere we ask the
# PyTorch CPU index), so pip never pulls several GB of CUDA packages. With a GPU we install
# the normal (CUDA) build. lmlab's own `torch>=2.2` requirement is then already satisfied.
set -euo pipefail

LMLAB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMLAB_VENV:-$LMLAB_ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_CPU_VERSION="${LMLAB_TORCH_CPU_VERSION:-2.13.0}"

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "lmlab needs Python >= 3.10; found $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.x" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=(pip_quiet "$VPY" -m pip install --disable-pip-version-check -q)
# Some pip configurations list optional local indexes that do not exist on every machine;
# pip warns about each of them on every call. Keep the log readable; real errors still show.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
  if has_gpu; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
    "${PIP[@]}" torch
  else
    echo "[setup] no GPU: installing the CPU build of torch ($TORCH_CPU_VERSION)"
    "${PIP[@]}" "torch==$TORCH_CPU_VERSION" 2>/dev/null \
      || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# Reinstall lmlab only when its metadata changed (editable install: code edits need nothing).
stamp="$VENV/.lmlab-installed"
want="$(cat "$LMLAB_ROOT/pyproject.toml" | "$VPY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VPY" -c 'import lmlab' >/dev/null 2>&1; then
  echo "[setup] installing lmlab and its dependencies into $VENV"
  "${PIP[@]}" -e "$LMLAB_ROOT[dev]"
  echo "$want" > "$stamp"
fi
# lm-evaluation-harness (the `lm_eval` extra), so tests/test_lm_harness.py runs our model against
# lm-eval's own HF backend: ~150 MB and about a minute to install, once. Without it (no index
# reachable) that test module skips and everything else works. Installed before recurrentgemma:
# pip checks the whole environment on each install, and would warn about recurrentgemma's
# dependencies, which are left out on purpose.
if ! "$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("lm_eval") is None)' 2>/dev/null; then
  "${PIP[@]}" "lm-eval>=0.4" || echo "[setup] lm-eval not installed: tests/test_lm_harness.py will skip" >&2
fi
# The JAX backend (the `jax` extra: jax, flax, optax, orbax-checkpoint, and typeguard 2 for
# recurrentgemma.jax; ~700 MB, ~15 s from the index), so tests/test_jax_*.py compare it with the
# torch models. Without it those skip.
if ! "$VPY" -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(p) is None for p in ("jax", "flax", "optax", "orbax", "typeguard")))' 2>/dev/null; then
  "${PIP[@]}" "jax>=0.9" "flax>=0.12" "optax>=0.2" "orbax-checkpoint>=0.6" "typeguard>=2.13,<3" \
    || echo "[setup] the jax extra not installed: tests/test_jax_*.py will skip" >&2
fi
# Google DeepMind's recurrentgemma: its torch model is the Griffin parity test's reference, its
# JAX model lmlab's Griffin with backend=jax. It pins numpy<2.4, which lmlab's numpy runs fine,
# so it is installed without dependencies (einops, jaxtyping: the dev extra; typeguard: above).
if ! "$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("recurrentgemma") is None)' 2>/dev/null; then
  "${PIP[@]}" --no-deps "recurrentgemma==1.0.1" || echo "[setup] recurrentgemma not installed: its parity test will skip" >&2
fi
export PATH="$VENV/bin:$PATH"
