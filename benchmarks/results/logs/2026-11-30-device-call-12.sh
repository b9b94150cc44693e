#!/usr/bin/env bash
# Device call 12 (1 H200): start-up after eager-for-small-jobs and the CPU half-GEMM probe, with the default worker
# preload (torch) and without it (RUNNER_WORKER_PRELOAD=0), cold + 1 warm each.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
timeout 115 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 1 \
    --workdir /tmp/bench-startup --out $OUT/r/startup-h200-eager.json > $OUT/r/startup.log 2>&1; echo "startup rc=$?" >> $OUT/r/startup.log
timeout 80 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 1 --env RUNNER_WORKER_PRELOAD=0 \
    --workdir /tmp/bench-startup --out $OUT/r/startup-h200-eager-nopreload.json > $OUT/r/startup-np.log 2>&1; echo "nopreload rc=$?" >> $OUT/r/startup-np.log
tail -4 $OUT/r/startup.log | cut -c1-700; tail -4 $OUT/r/startup-np.log | cut -c1-700
