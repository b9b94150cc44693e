#!/usr/bin/env bash
# Device call 8 (x2): the start-up GPU test (PYTHONPATH fix eec42d0), the two-GPU pipeline test, and bench_driver (CPU) on the GPU host.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
( timeout 320 python3 scripts/bench_driver.py --records 40000 --medians 60,300 --dims 1280,2560 --part-writers driver,actors --repeats 3 \
    --out $OUT/r/driver-scale-h200host.json > $OUT/r/driver.log 2>&1; echo "bench_driver rc=$?" >> $OUT/r/driver.log ) &
( timeout 320 python3 -m pytest -m gpu -q -rs -s -p no:cacheprovider tests/test_startup.py tests/test_gpu_pipeline.py -k "loads_beside or every_gpu_embeds" \
    > $OUT/r/gpu-tests.log 2>&1; echo "gpu tests rc=$?" >> $OUT/r/gpu-tests.log ) &
wait
tail -15 $OUT/r/driver.log; grep -E "passed|failed|rc=|^FAILED|^ERROR|SKIPPED" $OUT/r/gpu-tests.log | tail
