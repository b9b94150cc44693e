#!/usr/bin/env bash
# Device call 3 (x2): GPU0 = 650M per-token FP16 and 3 layers x 3 poolings vs pooled-only; GPU1 = GPU tests (new outputs, ESM-2, kernels, compile cache).
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 500 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 --outputs per_token_fp16,layers3 \
    --cpu-check 0 --out $OUT/r/outputs > $OUT/r/gpu0.log 2>&1
  echo "outputs bench rc=$?" >> $OUT/r/gpu0.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 480 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_outputs_gpu.py tests/test_esm2.py tests/test_fp16x3_attention.py tests/test_console.py > $OUT/r/gpu1-tests.log 2>&1
  echo "gpu tests rc=$?" >> $OUT/r/gpu1-tests.log
) &
wait
tail -22 $OUT/r/gpu0.log; grep -E "passed|failed|Error|cosine|rc=" $OUT/r/gpu1-tests.log | tail -30
