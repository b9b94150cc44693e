#!/usr/bin/env bash
# Device call 10 (x2): start-up after the cuts, 650M on one H200 and the CPU quickstart on the host, then the read
# task's bench on the host CPU and GPU tests (GPU 0); the per-token CRC A/B again, variants in the other order (GPU 1).
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
(
  CUDA_VISIBLE_DEVICES=0 timeout 230 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 2 \
      --workdir /tmp/bench-startup --out $OUT/r/startup-h200.json > $OUT/r/startup.log 2>&1; echo "startup rc=$?" >> $OUT/r/startup.log
  CUDA_VISIBLE_DEVICES= timeout 100 python3 scripts/bench_startup.py --cpu --warm-runs 2 --workdir /tmp/bench-cpu \
      --out $OUT/r/cpu-quickstart-h200host.json > $OUT/r/cpu-startup.log 2>&1; echo "cpu startup rc=$?" >> $OUT/r/cpu-startup.log
  timeout 150 python3 scripts/bench_driver.py --records 100000 --medians 60,300 --dims 1280,2560 --stages read --dedup \
      --repeats 3 --out $OUT/r/read-fast-h200host.json > $OUT/r/read.log 2>&1; echo "read bench rc=$?" >> $OUT/r/read.log
  CUDA_VISIBLE_DEVICES=0 timeout 170 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_startup.py \
      tests/test_gpu_pipeline.py tests/test_esm2.py tests/test_esmc.py > $OUT/r/gpu-tests.log 2>&1; echo "gpu tests rc=$?" >> $OUT/r/gpu-tests.log
) &
( CUDA_VISIBLE_DEVICES=1 timeout 500 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 \
    --outputs per_token_fp16_nocrc,per_token_fp16 --repeats 2 --cpu-check 0 --out $OUT/r/crcab2/ > $OUT/r/crc-ab2.log 2>&1
  echo "crc rc=$?" >> $OUT/r/crc-ab2.log ) &
wait
for f in startup cpu-startup read; do echo "== $f"; tail -6 $OUT/r/$f.log; done
grep -E "passed|failed|rc=|^FAILED|^ERROR" $OUT/r/gpu-tests.log | tail -8; grep -E "vs_pooled|rc=|per-token:" $OUT/r/crc-ab2.log | tail -8
