#!/usr/bin/env bash
# The GPU check, one prepared script (about 5 minutes on one card; under 8):
#   1. the CUDA-marked tests (tests/test_cuda.py: bf16 training, QLoRA's NF4 base, generation on CUDA);
#   2. scripts/bench.py in bf16 on a random-init Llama-shaped model of ~1.1B parameters
#      (scripts/gpu_inputs.py): LoRA q/v against Trainer + PEFT, and QLoRA, with the GFLOP/s each run
#      achieved and its share of the card's bf16 matmul peak measured at start (MFU).
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default runs/gpu_check; PY=... picks the interpreter)
# Without a CUDA GPU it says so in one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${1:-runs/gpu_check}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): nothing to check on this machine"
  exit 0
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
failed=0
timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" || failed=1
timeout 120 "$PY" scripts/gpu_inputs.py "$OUT" || failed=1
timeout 300 "$PY" scripts/bench.py --workloads smollm2-qv,qlora-qv --precisions bf16 --pairs 1 --steps 10 --warmup 3 \
  --no-scaling --packing off --llm-model "$OUT/llama-1b" --llm-data "$OUT/alpaca.json" --llm-max-length 256 \
  --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" || failed=1
echo "gpu_check: $([ $failed = 0 ] && echo passed || echo FAILED); results in $OUT (tests.log, bench/results.md)"
exit $failed
