#!/usr/bin/env bash
# Device call 1 (x2): GPU0 = the new models' GPU tests (ESM C, HF ESM-2) and the quiet CLI test; GPU1 = start-up cold/warm, then --dedup.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/r/gpus.txt
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 300 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_esmc.py > $OUT/r/gpu0-esmc.log 2>&1; echo "esmc tests rc=$?" >> $OUT/r/gpu0-esmc.log
  timeout 200 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_esm2_hf.py > $OUT/r/gpu0-hf.log 2>&1; echo "hf tests rc=$?" >> $OUT/r/gpu0-hf.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 280 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 2 \
    --workdir /tmp/bench-startup --out $OUT/r/2026-11-30-startup-h200.json > $OUT/r/gpu1.log 2>&1
  echo "startup rc=$?" >> $OUT/r/gpu1.log
  timeout 235 python3 scripts/bench.py dedup --model 650M --gpus 1 --seqs 40960 --repeat-fraction 0.4 --repeats 1 \
    --timeout 225 --out $OUT/r >> $OUT/r/gpu1.log 2>&1
  echo "dedup rc=$?" >> $OUT/r/gpu1.log
) &
wait
ls -la $OUT/r
tail -15 $OUT/r/gpu0-esmc.log; tail -15 $OUT/r/gpu0-hf.log; tail -40 $OUT/r/gpu1.log
