#!/usr/bin/env bash
# Every GPU figure the docs quote, as one markdown table (at most 8 minutes on one H100 / H200):
#
#     bash bench/gpu.sh            # on a CUDA machine, from anywhere
#     bash bench/gpu.sh --dry-run  # tiny shapes on CPU, one step each: checks every part runs
#
# Each part runs under its own time limit (the seconds below, 475 in all); a part that fails or
# runs out of time gets the row "failed: <its last line>" and the next part still runs.
# Random real-shape weights (bench/train_step.py's SHAPES), the tiny model's offline tokenizer;
# nothing is downloaded. The train.py runs use the bundled tiny-lm. The parts are in
# bench/gpu_parts.py. A dry run runs them side by side, each within 120 s (GPU_SH_DRY_LIMIT), and
# without torch.compile (TORCHDYNAMO_DISABLE=1: the compiled paths run eagerly); its figures mean
# nothing.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
    DRY="--dry-run"
    export CUDA_VISIBLE_DEVICES="" TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1
elif [ $# -gt 0 ]; then
    echo "usage: bash bench/gpu.sh [--dry-run]" >&2
    exit 2
fi
python bench/gpu_parts.py check || exit 1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
N=0

run_part() {  # run_part FILE LABEL SECONDS COMMAND...: its rows, or one "failed" row
    local file=$1 label=$2 limit=$3
    # side by side, about 45 s on 2 idle cores; the limit leaves room for a busy machine
    if [ -n "$DRY" ]; then limit=${GPU_SH_DRY_LIMIT:-120}; fi
    shift 3
    timeout -k 10 "$limit" "$@" >"$file.rows" 2>"$file.log"
    local rc=$?
    if [ $rc -ne 0 ]; then
        local why
        why=$(grep -v '^[[:space:]]*$' "$file.log" | tail -n 1 | cut -c1-200 | tr '|' '/')
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="timed out after $limit s"; fi
        echo "| $label | failed: ${why:-exit status $rc} |" >"$file.rows"
    fi
}

part() {  # part LABEL SECONDS COMMAND...: in order on a GPU, side by side in a dry run
    N=$((N + 1))
    local file
    file=$TMP/$(printf %02d $N)
    if [ -n "$DRY" ]; then run_part "$file" "$@" & else run_part "$file" "$@"; fi
}

if [ -n "$DRY" ]; then  # the same parts, tiny
    S1=tiny; S4=tiny; BIG=(--batch-size 2 --group-size 2 --max-new-tokens 4)
    SMALL=(--batch-size 2 --group-size 2 --max-new-tokens 4); ROWS=2; STEPS=1
else
    S1=Qwen2.5-1.5B; S4=Qwen3-4B; BIG=(--batch-size 16 --group-size 8 --max-new-tokens 128)
    SMALL=(--batch-size 8 --group-size 8 --max-new-tokens 64); ROWS=64; STEPS=2
fi
GPUS=1
if [ -z "$DRY" ]; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c GPU); fi
if [ "$GPUS" -gt 2 ]; then GPUS=2; elif [ "$GPUS" -lt 1 ]; then GPUS=1; fi
BACKEND=$([ -n "$DRY" ] && echo gloo || echo nccl)
STEP=(bench/train_step.py --paths sampler --steps 1 --grad-checkpointing --micro-batch-size 2)
TRAIN=(train.py --model tiny-lm --steps $STEPS --batch-size 4 --mini-batch-size 4
       --group-size 4 --max-new-tokens 16 --log-rationales 0 --save-every 100)
if python train.py -h | grep -q -- --lora-rank; then
    LORA=(python "${STEP[@]}" --shape $S4 "${SMALL[@]}" --compile on --rollout-rows $ROWS
          --lora-rank 16)
else
    LORA=(echo "| LoRA | not available: train.py has no --lora-rank |")
fi

part "rollout" 110 python bench/gpu_parts.py $DRY rollout
part "train step $S1" 130 python bench/gpu_parts.py step "train step $S1" -- \
    python "${STEP[@]}" --shape $S1 "${BIG[@]}" --compile off,on
part "$S4 FSDP offload" 90 python bench/gpu_parts.py step \
    "$S4 FSDP offload, torchrun 1 process, rollout-rows $ROWS" -- \
    torchrun --nproc_per_node=1 "${STEP[@]}" --shape $S4 "${SMALL[@]}" --compile on \
    --fsdp --offload --rollout-rows $ROWS
if [ "${LORA[0]}" = echo ]; then
    part "LoRA" 10 "${LORA[@]}"
else
    part "$S4 LoRA" 70 python bench/gpu_parts.py step \
        "$S4 LoRA r16, 1 GPU, rollout-rows $ROWS" -- "${LORA[@]}"
fi
part "train.py --compile on" 45 python bench/gpu_parts.py train \
    "train.py --compile on (tiny-lm, $STEPS steps)" $STEPS -- python "${TRAIN[@]}" --compile on
part "train.py under torchrun" 30 python bench/gpu_parts.py train \
    "train.py under torchrun, $BACKEND, $GPUS process(es) (tiny-lm, $STEPS steps)" $STEPS -- \
    torchrun --nproc_per_node="$GPUS" "${TRAIN[@]}" --compile off
wait

echo "GPU figures: $(python bench/gpu_parts.py device)${DRY:+ (dry run: tiny shapes, no figure)}"
echo
echo "| figure | result |"
echo "|---|---|"
cat "$TMP"/*.rows
echo
echo "($((SECONDS - START)) s)"
