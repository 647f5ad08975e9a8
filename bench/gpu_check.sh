#!/usr/bin/env bash
# The GPU code paths, run once on one H100/H200-class GPU in under 8 minutes:
#   1. the MAE ViT-B/16 training step in bf16 at 224 px: images/s and model-FLOPs
#      utilisation against the GPU's bf16 peak, beside HF's ViTMAEForPreTraining;
#   2. the MAE, long-sequence MAE + MFF and LoMaR steps at ViT-B sizes;
#   3. a two-trial study through `python -m orchestrator run` on a local Ray that
#      sees the GPU (use_gpu).
# Needs this project installed (bash setup.sh); nothing is fetched at run time.
# A part whose packages are missing is skipped with the reason, and the script
# exits non-zero at the end. --smoke runs the same parts tiny, on the CPU (a test).
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --smoke    # anywhere
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=0

if [[ "${1:-}" == "--smoke" ]]; then
  step1=(--device cpu --preset tiny --img-size 32 --patch-size 4 --in-chans 1 --batch 8 --rounds 1
         --steps-per-round 1 --warmup-steps 1)
  step2=(--device cpu --preset tiny --img-size 28 --patch-size 2 --in-chans 1 --batch 4 --steps 1)
  profile=local
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=1
  step1=(--device cuda --preset vit_base --img-size 224 --patch-size 16 --in-chans 3 --batch 128
         --rounds 4 --steps-per-round 5 --warmup-steps 3)
  step2=(--device cuda --preset vit_base --img-size 224 --patch-size 16 --in-chans 3 --batch 64 --steps 10)
  profile=cluster
fi

part() {  # part NAME TIMEOUT_S MODULES -- COMMAND...: run COMMAND unless a module is missing
  local name=$1 limit=$2 modules=$3
  shift 4
  echo "== $name"
  if ! "$PY" -c "import $modules" 2>/dev/null; then
    echo "skipped: needs the Python packages $modules (bash setup.sh installs them)"
    failed=1
    return
  fi
  timeout "$limit" "$@" || { echo "FAILED: $name (exit $?)"; failed=1; }
}

part "1. MAE step: ours vs HF ViTMAE" 240 "torch,timm,pydantic,transformers" -- \
  "$PY" bench/trainer_throughput.py "${step1[@]}"
part "2. MAE, MAE k2 + MFF and LoMaR steps" 120 "torch,timm,pydantic" -- \
  "$PY" bench/model_steps.py "${step2[@]}"
storage=$(mktemp -d)
part "3. a two-trial study on Ray ($profile profile)" 240 "torch,ray,optuna,mlflow" -- \
  "$PY" -m orchestrator run bench/studies/gpu_pair.py --profile "$profile" --storage "$storage"
rm -rf "$storage"
exit $failed
