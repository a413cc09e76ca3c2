#!/usr/bin/env bash
# Reproduces bench/results/finetune_cpu_2026-11-23 (the demo's fine-tuning mode, CPU, 2 cores per process).
#   1. pretrain once (cached at $CK);
#   2. a 3-point lr sweep per method on seed 2, which the table does not report (three processes side by
#      side, each pinned to its own 2 cores);
#   3. the reported run: seeds 0 and 1, each method at the lr that gave it the lowest final eval loss in 2,
#      alone on cores 0-1 (its s/run column is that setting's timing).
# Usage: bash bench/finetune_cpu.sh [OUT]   (needs 6 free cores for step 2; about 5 minutes in all)
set -euo pipefail
OUT=${1:-bench/results/finetune_cpu_2026-11-23}
CK=${CK:-/tmp/lowrank_kernels_finetune_pretrained.pt}
export OMP_NUM_THREADS=2 PYTHONPATH=${PYTHONPATH:-$PWD}
ft() { python -m lowrank_kernels.demo.finetune --checkpoint "$CK" "$@"; }

mkdir -p "$OUT/sweep"
taskset -c 0,1 python - "$CK" <<'EOF'
import sys
from lowrank_kernels.demo.finetune import parse_args, pretrain
from lowrank_kernels.demo.data import load_splits
import torch
args = parse_args(["--checkpoint", sys.argv[1]])
pretrain(args, load_splits()[0], torch.device("cpu"))
EOF

LORA=(1e-3 3e-3 1e-2); GA=(1e-3 3e-3 1e-2); DEEP=(3e-3 1e-2 3e-2); SB=(1e-3 3e-3 1e-2)
GALORE=(3e-3 1e-2 3e-2); FULL=(3e-4 1e-3 3e-3)
for i in 0 1 2; do
  taskset -c $((2 * i)),$((2 * i + 1)) python -m lowrank_kernels.demo.finetune --checkpoint "$CK" --seeds 2 \
    --lr-lora "${LORA[i]}" --lr-ga "${GA[i]}" --lr-deep "${DEEP[i]}" --lr-sb "${SB[i]}" \
    --lr-galore "${GALORE[i]}" --lr-full "${FULL[i]}" --out "$OUT/sweep/lr$i" > "$OUT/sweep/lr$i.log" 2>&1 &
done
wait

BEST=$(python - "$OUT/sweep" <<'EOF'
import json, sys
from lowrank_kernels.demo.finetune import LR_ARGS
runs = [r for i in range(3) for r in json.load(open(f"{sys.argv[1]}/lr{i}/results.json"))["runs"]]
flags = []
for method, arg in LR_ARGS.items():
    best = min((r for r in runs if r["method"] == method), key=lambda r: r["eval"])
    flags += ["--" + arg.replace("_", "-"), repr(best["lr"])]
print(" ".join(flags))
EOF
)
echo "best lrs (seed 2 sweep): $BEST" | tee "$OUT/sweep/best_lrs.txt"
# shellcheck disable=SC2086
taskset -c 0,1 python -m lowrank_kernels.demo.finetune --checkpoint "$CK" --seeds 0 1 $BEST --out "$OUT"
