#!/usr/bin/env bash
# Device call 6 (x2): GPU0 = per-token FP16 (CRC-32 per token file, 22cb2e7) and --part-writer actors (cde1475) against pooled, paired
# repeats; CRC cost on this quiet host's CPU; ESM-2/ESM C GPU tests (layer loop moved, 629746f).
# GPU1 = start-up (overlapped Ray start, mmap load, early GPU shadow, fast end) cold + 2 warm; GPU tests console/pooling/outputs/pipeline.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 360 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 --outputs per_token_fp16,actor_parts --repeats 2 \
    --seqs 650M=10240 --cpu-check 0 --out $OUT/r/outputs > $OUT/r/gpu0.log 2>&1
  echo "outputs bench rc=$?" >> $OUT/r/gpu0.log
  timeout 60 python3 scripts/bench_checksum.py --rows 32768 --dim 1280 --repeats 7 --out $OUT/r/checksum-cost.json >> $OUT/r/gpu0.log 2>&1
  timeout 60 python3 scripts/bench_checksum.py --per-token --tokens 65536 --dim 1280 --dtype float16 --repeats 7 \
    --out $OUT/r/checksum-cost-per-token.json >> $OUT/r/gpu0.log 2>&1
  echo "checksum rc=$?" >> $OUT/r/gpu0.log
  timeout 70 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_esm2.py tests/test_esmc.py > $OUT/r/gpu0-tests.log 2>&1
  echo "gpu tests rc=$?" >> $OUT/r/gpu0-tests.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 300 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 2 --workdir /tmp/bench-startup \
    --out $OUT/r/startup-h200.json > $OUT/r/gpu1.log 2>&1
  echo "startup bench rc=$?" >> $OUT/r/gpu1.log
  timeout 260 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_console.py tests/test_pooling.py tests/test_outputs_gpu.py \
    tests/test_gpu_pipeline.py > $OUT/r/gpu1-tests.log 2>&1
  echo "gpu tests rc=$?" >> $OUT/r/gpu1-tests.log
) &
wait
grep -E "repeat|vs_pooled|rc=" $OUT/r/gpu0.log | tail -12; tail -5 $OUT/r/gpu1.log; grep -E "passed|failed|rc=|^FAILED|^ERROR" $OUT/r/gpu*-tests.log | tail -20
