#!/usr/bin/env bash
# Everything a lent GPU session measures, in one run; results under $OUT (device tool) or runs/gpu_check.
# Needs torch alone, plus transformers for the decode comparison (the GPU hosts have no tokenizer package or
# webdataset): bench/mfu.py trains on random tokens through train/lm.py's own model build and loop. Each part
# runs even when an earlier one fails; the summary at the end names the failures. About 6 minutes on one H200.
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember a failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" > >(tee "$OUT/$name.log") 2>&1 || failed+=("$name")
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# The 8B shape cut to 8 layers, seq 8192: bf16 params / fp32 reduce, compiled blocks, selective AC (the CUDA recipe).
step mfu_8b python3 bench/mfu.py --layers 8 --seq 8192 --steps 12 --json "$OUT/mfu_8b.json"
# The document-mask path the paper configs use (flex_attention), same shape.
step mfu_8b_flex python3 bench/mfu.py --layers 8 --seq 8192 --steps 12 --attn flex --json "$OUT/mfu_8b_flex.json"
# Context-parallel attention: each cp rank's queries against the whole row under causal + document masks,
# compiled flex_attention block mask vs SDPA's dense mask, forward and backward in bf16.
step cp_attention python3 bench/cp_attention.py --json "$OUT/cp_attention.json"
# Decode: ours (eager and compiled) beside HF LlamaForCausalLM on the same weights, fp32 and bf16, with the greedy
# ids compared token for token; the 8B shape cut to 8 layers.
step decode python3 bench/generate.py --device cuda --preset llama3-8b --layers 8 --prompt-len 128 \
  --new-tokens 128 --repeats 5
echo "=== failed: ${failed[*]:-none}" | tee "$OUT/summary.txt"
