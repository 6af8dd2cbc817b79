#!/usr/bin/env bash
# One GRPO step of the real-sized captioners on one GPU: bf16 LoRA and 4-bit QLoRA, G=8, stock TRL and
# group-shared vision, each side in its own process (benchmarks/grpo_step.py). Offline; under 8 minutes.
#
#   benchmarks/gpu_step.sh [CSV]          # default: $OUT/gpu_steps.csv (or ./gpu_steps.csv)
#
# Writes one CSV row per side as it finishes (model, quant, shared, peak_gb = torch.cuda.max_memory_allocated
# in 2^30 bytes, step_s and its split preprocess_s, generation_s, reward_s, forward_backward_s, other_s) and
# the runs' output to <CSV>.log. A run that would pass the time budget is skipped and named in the log, so the rows written so far always come back.
# Knobs (environment): MODELS, QUANTS, STEPS (timed steps after one warm-up), BUDGET_S, DEVICE, PYTHON,
# DRY_RUN=1 (build models and trainers, no steps: with DEVICE=cpu MODELS=smolvlm256 it checks this path on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VIZER_BENCH_CACHE="${VIZER_BENCH_CACHE:-${TMPDIR:-/tmp}/vizer-real-sized}"  # random checkpoints for 4-bit loads

CSV="${1:-${OUT:-.}/gpu_steps.csv}"
LOG="${CSV%.csv}.log"
MODELS="${MODELS:-smolvlm256 smolvlm500 smolvlm2b qwen2vl2b}"
QUANTS="${QUANTS:-none 4bit}"
STEPS="${STEPS:-2}"
BUDGET_S="${BUDGET_S:-450}"  # leaves headroom under 8 minutes for start-up and the last run's exit
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
DRY=()
[ "${DRY_RUN:-0}" = 1 ] && DRY=(--dry-run)

mkdir -p "$(dirname "$CSV")"
: >"$LOG"
if [ "$DEVICE" = cuda ]; then
  # fail in seconds, not after a model build, when the carried Python has no CUDA or no bitsandbytes
  if ! "$PYTHON" -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" >>"$LOG" 2>&1; then
    echo "gpu_step: $PYTHON cannot use CUDA with bitsandbytes; see $LOG" >&2
    tail -n 5 "$LOG" >&2
    exit 2
  fi
fi

# the per-model ceiling of one run (both sides); bigger models build and step longer
cap_for() { case "$1" in smolvlm2b | qwen2vl2b) echo 170 ;; *) echo 110 ;; esac; }

start=$SECONDS
status=0
for model in $MODELS; do
  for quant in $QUANTS; do
    left=$((BUDGET_S - (SECONDS - start)))
    cap=$(cap_for "$model")
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 40 ]; then
      echo "gpu_step: skipped $model $quant: ${left}s of the budget left" | tee -a "$LOG" >&2
      continue
    fi
    echo "== $model $quant (cap ${cap}s, $((SECONDS - start))s used)" >>"$LOG"
    if ! timeout --kill-after=10 "$cap" "$PYTHON" -m benchmarks.grpo_step --device "$DEVICE" --model "$model" \
      --quant "$quant" --repeats 1 --steps "$STEPS" --csv "$CSV" ${DRY[@]+"${DRY[@]}"} >>"$LOG" 2>&1; then
      echo "gpu_step: $model $quant failed or timed out (see $LOG)" >&2
      status=1
    fi
  done
done
echo "gpu_step: $((SECONDS - start))s; rows in $CSV" >&2
[ -f "$CSV" ] && cat "$CSV"
exit $status
