#!/usr/bin/env bash
# Everything a lent GPU session measures, in one run; results under $OUT (device tool) or runs/gpu_check.
# Needs torch alone (the GPU hosts have no tokenizer package, transformers or webdataset): bench/mfu.py trains on
# random tokens through train/lm.py's own model build and loop. About 5 minutes on one H100/H200.
#   bash bench/gpu_check.sh
set -euo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# Issue 4's figure: the 8B shape cut to 8 layers, seq 8192, bf16 params / fp32 reduce, compiled, selective AC.
python3 bench/mfu.py --layers 8 --seq 8192 --steps 12 --json "$OUT/mfu_8b.json" 2>&1 | tee "$OUT/mfu_8b.log"
# The document-mask path the paper configs use (flex_attention), same shape.
python3 bench/mfu.py --layers 8 --seq 8192 --steps 12 --attn flex --json "$OUT/mfu_8b_flex.json" 2>&1 \
  | tee "$OUT/mfu_8b_flex.log"
# Context-parallel attention (issue 5): each cp rank's queries against the whole row under causal + document masks,
# compiled flex_attention block mask vs SDPA's dense mask, forward and backward in bf16.
python3 bench/cp_attention.py --json "$OUT/cp_attention.json" 2>&1 | tee "$OUT/cp_attention.log"
