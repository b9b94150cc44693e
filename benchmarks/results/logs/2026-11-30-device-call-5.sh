#!/usr/bin/env bash
# Device call 5 (x2): GPU0 = several layers x poolings (pooling rewrite 815e82c/d5db214): bench_pooling + end-to-end alternating repeats;
# GPU1 = start-up (compile-cache fix ef43880, exit at once c7cd363) cold + 2 warm, then GPU tests (pooling, console, outputs, pipeline).
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
git log --oneline -1 > $OUT/r/commit.txt
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 120 python3 scripts/bench_pooling.py --arch 650M --tokens 65536 --reps 30 --out $OUT/r/pooling.json > $OUT/r/gpu0.log 2>&1
  echo "bench_pooling rc=$?" >> $OUT/r/gpu0.log
  timeout 420 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 --outputs layers3 --repeats 3 \
    --seqs 650M=10240 --cpu-check 0 --out $OUT/r/layers3 >> $OUT/r/gpu0.log 2>&1
  echo "layers3 bench rc=$?" >> $OUT/r/gpu0.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 330 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 2 --workdir /tmp/bench-startup \
    --out $OUT/r/startup-h200.json > $OUT/r/gpu1.log 2>&1
  echo "startup bench rc=$?" >> $OUT/r/gpu1.log
  timeout 200 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_pooling.py tests/test_console.py tests/test_outputs_gpu.py \
    > $OUT/r/gpu1-tests.log 2>&1
  echo "gpu tests rc=$?" >> $OUT/r/gpu1-tests.log
) &
wait
tail -12 $OUT/r/gpu0.log; tail -25 $OUT/r/gpu1.log; grep -E "passed|failed|Error|rc=" $OUT/r/gpu1-tests.log | tail -20
