#!/usr/bin/env bash
# Device call 4 (x2): GPU0 = per-token FP16 vs pooled after the write/forward overlap (00a2e70); GPU1 = GPU pipeline and outputs tests with two calls per actor.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 300 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 --outputs per_token_fp16 \
    --cpu-check 0 --out $OUT/r/outputs > $OUT/r/gpu0.log 2>&1
  echo "outputs bench rc=$?" >> $OUT/r/gpu0.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 290 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu_pipeline.py tests/test_outputs_gpu.py tests/test_console.py > $OUT/r/gpu1-tests.log 2>&1
  echo "gpu tests rc=$?" >> $OUT/r/gpu1-tests.log
) &
wait
tail -8 $OUT/r/gpu0.log; grep -E "passed|failed|Error|cosine|rc=" $OUT/r/gpu1-tests.log | tail -20
