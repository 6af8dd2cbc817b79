#!/usr/bin/env bash
# GRPO steps of the real recipes' settings on one GPU: stock TRL vs the runner's shared path (each distinct
# picture preprocessed once, group-shared vision, group-shared prompt in the language model), each side in its
# own process (benchmarks/grpo_step.py --recipe). Random real-sized models, offline; under 8 minutes.
#
#   benchmarks/gpu_step.sh [CSV]          # default: $OUT/gpu_steps.csv (or ./gpu_steps.csv)
#   PYTHON=python3 benchmarks/gpu_step.sh "$OUT/gpu_steps.csv"   # a machine whose python3 has the packages
#
# Rows (ROWS, one per line: a recipe name and extra grpo_step flags): the three real recipes at their own G,
# images per step, per-device batch, completion length, quantization and processor options, and the two SmolVLM
# recipes with image splitting (the 256M one second), then (last: it displaces nothing) the 256M recipe's shared
# side without and with a static KV cache (TRL's `cache_implementation`; 1.04x on a 2-core CPU). Writes one CSV
# row per side as it finishes (model = the result name, quant, shared, peak_gb =
# torch.cuda.max_memory_allocated in 2^30 bytes, step_s, images_per_s, the split preprocess_s, generation_s,
# reward_s, forward_backward_s, other_s, preprocess_calls_per_distinct_image, ...) and the runs' output to
# <CSV>.log. A row that would pass the time budget is skipped and named in the log, so
# the rows written so far always come back.
# Knobs (environment): ROWS, STEPS (timed steps after one warm-up), BUDGET_S, DEVICE, PYTHON,
# DRY_RUN=1 (build models and trainers, no steps: with DEVICE=cpu ROWS=smolvlm256-openimages it checks this
# path on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VIZER_BENCH_CACHE="${VIZER_BENCH_CACHE:-${TMPDIR:-/tmp}/vizer-real-sized}"  # random checkpoints for 4-bit loads

CSV="${1:-${OUT:-.}/gpu_steps.csv}"
LOG="${CSV%.csv}.log"
# the 256M image-splitting row (the one with a GPU target: >= 3x stock, <= 1/3 of its memory) runs second, so
# the budget cannot skip it; the 2.2B splitting row, the longest, runs after the three recipes
DEFAULT_ROWS="smolvlm256-openimages
smolvlm256-openimages --image-splitting
qwen2vl-openimages
smolvlm-openimages
smolvlm-openimages --image-splitting
smolvlm256-openimages --generation-option cache_implementation=static"
ROWS="${ROWS:-$DEFAULT_ROWS}"
STEPS="${STEPS:-1}"
BUDGET_S="${BUDGET_S:-450}"  # leaves headroom under 8 minutes for start-up and the last run's exit
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-.venv/bin/python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
DRY=()
[ "${DRY_RUN:-0}" = 1 ] && DRY=(--dry-run)

if ! [[ "$BUDGET_S" =~ ^[0-9]+$ ]] || [ "$BUDGET_S" -lt 40 ]; then
  echo "gpu_step: BUDGET_S must be at least 40 seconds (one row's least), got '$BUDGET_S'" >&2
  exit 2
fi
mkdir -p "$(dirname "$CSV")"
: >"$LOG"
if [ "$DEVICE" = cuda ]; then
  # fail in seconds, not after a model build, when the carried Python has no CUDA or no bitsandbytes
  if ! "$PYTHON" -c "import torch, bitsandbytes, trl; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" >>"$LOG" 2>&1; then
    echo "gpu_step: $PYTHON cannot use CUDA with bitsandbytes and trl; see $LOG" >&2
    tail -n 5 "$LOG" >&2
    exit 2
  fi
fi

# the ceiling of one row (both sides); the 2.2B recipes build (4-bit: save and reload) and step longer
cap_for() { case "$1" in smolvlm-openimages* | qwen2vl*) echo 150 ;; *) echo 130 ;; esac; }  # the 256M rows took ~95 s on an H200

start=$SECONDS
status=0
ran=0
while IFS= read -r row; do
  [ -z "$row" ] && continue
  left=$((BUDGET_S - (SECONDS - start)))
  cap=$(cap_for "$row")
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 40 ]; then
    echo "gpu_step: skipped '$row': ${left}s of the budget left" | tee -a "$LOG" >&2
    continue
  fi
  echo "== $row (cap ${cap}s, $((SECONDS - start))s used)" >>"$LOG"
  ran=$((ran + 1))
  # shellcheck disable=SC2086  # a row is a recipe name and flags
  if ! timeout --kill-after=10 "$cap" "$PYTHON" -m benchmarks.grpo_step --device "$DEVICE" --recipe $row \
    --repeats 1 --steps "$STEPS" --csv "$CSV" ${DRY[@]+"${DRY[@]}"} >>"$LOG" 2>&1 </dev/null; then
    echo "gpu_step: '$row' failed or timed out (see $LOG)" >&2
    status=1
  fi
done <<<"$ROWS"
if [ "$ran" -eq 0 ]; then
  echo "gpu_step: no row ran (the budget skipped them all); nothing written to $CSV" >&2
  exit 1
fi
if [ -f "$CSV" ]; then
  echo "gpu_step: $((SECONDS - start))s; rows in $CSV" >&2
  cat "$CSV"
else
  echo "gpu_step: $((SECONDS - start))s; no row finished, nothing written to $CSV (see $LOG)" >&2
fi
exit $status
