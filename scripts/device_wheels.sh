#!/usr/bin/env bash
# Downloads, here, the wheels that the lent GPU machine's image lacks into .whl/ (git-ignored),
# for scripts/gpu_checks.py there: that machine reaches no package registry, and its python3
# is 3.12 with torch, JAX, transformers and most of what lmlab needs already installed
# (docs/hardware.md, "Measuring on a lent GPU"). Versions: those of this checkout's .venv where
# it has the package, so both machines run the same ones. About 3.5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(pydantic pydantic-core annotated-types typing-inspection typeguard recurrentgemma fastapi starlette uvicorn
      gguf)
pins=()
for p in "${PKGS[@]}"; do
  v=""
  if [ -x .venv/bin/python ]; then
    v="$(.venv/bin/python -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}' || true)"
  fi
  pins+=("$p${v:+==$v}")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
ls .whl
