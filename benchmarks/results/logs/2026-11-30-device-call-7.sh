#!/usr/bin/env bash
# Device call 7 (x2): GPU tests after the regrouping and the shared layer loop. GPU0 = model tests (ESM-2 fair-esm and HF, ESM C, DNABERT);
# GPU1 = start-up, console (compile cache), pipeline (+ the --part-writer actors GPU test of 400b58b, copied in), attention kernels.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
cp build/gpu/test_gpu_pipeline_400b58b.py tests/test_gpu_pipeline.py
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 450 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_esm2.py tests/test_esm2_hf.py tests/test_esmc.py tests/test_dnabert.py \
    > $OUT/r/gpu0-tests.log 2>&1
  echo "gpu0 tests rc=$?" >> $OUT/r/gpu0-tests.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 450 python3 -m pytest -m gpu -q -rs -s -p no:cacheprovider tests/test_startup.py tests/test_console.py tests/test_gpu_pipeline.py \
    tests/test_attention.py tests/test_fp16x3_attention.py > $OUT/r/gpu1-tests.log 2>&1
  echo "gpu1 tests rc=$?" >> $OUT/r/gpu1-tests.log
) &
wait
grep -E "passed|failed|rc=|^FAILED|^ERROR|SKIPPED" $OUT/r/gpu*-tests.log | tail -30
