#!/usr/bin/env bash
# The GPU check of the bench, one script for one lent GPU (about ten minutes on an H200):
#   1. python -m bench.speed for sdxl and for sd15 on the released architectures with random weights (no
#      download): training rows (a micro batch, and a whole optimizer step at the effective batch),
#      generation and self-reward, each with TFLOP per unit, TFLOP/s and MFU, and the estimate;
#   2. one DPO step with each shipped accelerate config (configs/accelerate_fsdp_sdxl_8gpu.yaml,
#      configs/accelerate_deepspeed_zero2_sdxl_8gpu.yaml) at one process, on tiny-sdxl, so that those
#      paths have run; the DeepSpeed step is reported skipped where deepspeed is not installed.
# It writes $OUT/bench_<card>.txt (the date, the card, the versions, each command and its output) as it
# goes, so a run stopped early keeps what it measured, and exits 1 if any step failed.
#
#   OUT=/tmp/check bash bench/gpu_check.sh           # on the GPU
#   DRY=1 OUT=/tmp/check bash bench/gpu_check.sh     # the same steps on the CPU with the tiny presets
#
# Settings (environment): SDXL_BATCH=32 and SD15_BATCH=128 pairs per timed optimizer step (the preset's
# effective batch is 128: an SDXL step of 128 pairs takes minutes), STEPS=2 timed micro-batch steps,
# SPEED_FLAGS="" (e.g. "compile-regional": also those rows), BENCH_ARGS="" (more flags for both benches),
# time limits in seconds SDXL_LIMIT=270, SD15_LIMIT=200, STEP_LIMIT=90 (each accelerate step);
# WHEELS=folder: pip-install the wheels in it first (into /tmp/site) on a machine that lacks packages:
# diffusers; for the DeepSpeed step deepspeed (PyPI has its source only: `pip wheel deepspeed --no-deps`
# builds the wheel) and those of its requirements the machine lacks (hjson, pydantic and its own).
set -uo pipefail
KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$KIT"
export PYTHONPATH="$KIT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder for the report}
mkdir -p "$OUT"
if [[ -n "${WHEELS:-}" ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
failed=0

if [[ -n "${DRY:-}" ]]; then
  CARD=cpu
  BENCH=("tiny-sdxl --micro-batch 2 --batch-size 4 --gen-batch 2 --reward-images 2 --steps 1"
         "tiny-sd15 --micro-batch 2 --batch-size 4 --gen-batch 2 --reward-images 2 --steps 1")
  LIMITS=(900 900)  # two CPU cores
else
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($NF)}')
  BENCH=("sdxl --random-weights --batch-size ${SDXL_BATCH:-32} --steps ${STEPS:-2}"
         "sd15 --random-weights --batch-size ${SD15_BATCH:-128} --steps ${STEPS:-2}")
  LIMITS=("${SDXL_LIMIT:-270}" "${SD15_LIMIT:-200}")
fi
REPORT="$OUT/bench_${CARD}.txt"

{
  echo "# bench/gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [[ -z "${DRY:-}" ]]; then
    echo "# $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  fi
  $PY - <<'EOF'
import importlib, platform
versions = [f"python {platform.python_version()}"]
for name in ("torch", "diffusers", "transformers", "accelerate", "deepspeed"):
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        versions.append(f"{name} not installed")
print("# " + ", ".join(versions))
EOF
} > "$REPORT" 2>&1

step() {  # step SECONDS TITLE COMMAND...: run one step with a time limit, its output into the report
  local limit=$1 title=$2 start=$SECONDS status=0
  shift 2
  printf '\n$ %s\n' "$*" >> "$REPORT"
  timeout "$limit" "$@" >> "$REPORT" 2>&1 || status=$?
  echo "[$title: $([[ $status == 0 ]] && echo ok || echo "failed, exit $status") in $((SECONDS - start)) s]" | tee -a "$REPORT"
  [[ $status == 0 ]] || failed=1
  return $status
}

for i in "${!BENCH[@]}"; do
  args=${BENCH[$i]}
  # shellcheck disable=SC2086  # the settings are flags, split on purpose
  step "${LIMITS[$i]}" "bench ${args%% *}" $PY -m bench.speed --preset $args --no-naive ${BENCH_ARGS:-} \
    ${SPEED_FLAGS:+--speed-flags $SPEED_FLAGS}
done

$PY -c "from pathlib import Path; from bench.steps import write_pair_files; write_pair_files(Path('$SCRATCH'), 32, 2, 2)"
for config in fsdp deepspeed_zero2; do
  file=configs/accelerate_${config}_sdxl_8gpu.yaml
  if [[ $config == deepspeed_zero2 ]] && ! $PY -c "import deepspeed" 2>/dev/null; then
    printf '\n[%s step: skipped, deepspeed is not installed]\n' "$config" | tee -a "$REPORT"
    continue
  fi
  if step "${STEP_LIMIT:-90}" "$config step" $PY -m accelerate.commands.launch --config_file "$file" --num_processes 1 \
      04_train.py --init tiny-sdxl --pairs "$SCRATCH/pairs-2.jsonl" --out "$SCRATCH/$config/ckpt" --batch-size 2 \
      --max-steps 1 --save-every 0; then
    ran=$(grep -o "1 process(es), [A-Z_]*" "$SCRATCH/$config/log.txt" | tail -1)
    echo "[$config step ran as: ${ran#1 process(es), }]" | tee -a "$REPORT"
  fi
done
echo "wrote $REPORT"
exit $failed
