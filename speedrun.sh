#!/usr/bin/env bash
# One command from a fresh machine to a pretrained, evaluated, reported model.
#   ./speedrun.sh          the cpu preset (no GPU) or the gpu preset (CUDA found)
#   ./speedrun.sh smoke    every stage on a micro config (a few minutes on 2 CPU cores)
#   ./speedrun.sh NAME     configs/pipelines/NAME.yaml; extra args are overrides, e.g.
#   ./speedrun.sh cpu root=runs/mine
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
preset="${1:-}"
[ $# -gt 0 ] && shift
if [ -z "$preset" ]; then
  if "$VENV/bin/python" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then preset=gpu; else preset=cpu; fi
fi
cfg="configs/pipelines/$preset.yaml"
if [ ! -f "$cfg" ]; then
  echo "unknown preset '$preset': no $cfg (have: $(ls configs/pipelines | sed 's/.yaml//' | tr '\n' ' '))" >&2
  exit 2
fi
echo "[speedrun] pipeline $cfg"
exec "$VENV/bin/lmlab" pipeline "$cfg" "$@"
