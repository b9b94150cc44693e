#!/usr/bin/env bash
# Device call 16 (one H200, ~4 min): the driver takes each block as it is done (prefetch 0). The 12,000-protein 650M
# job (~4.5M tokens: auto runs it on Ray, compiled) cold + warm, and the 1,515-protein job on Ray (--engine ray) cold +
# warm: first output and wall, against call 15's (delivery 13.5-17 s) and call 13's (delivery 2.2 s).
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
timeout 200 python3 scripts/bench_startup.py --arch 650M --seqs 12000 --gpus 1 --warm-runs 1 \
    --workdir /tmp/bs-12k --out $OUT/r/startup-h200-12k-delivery.json > $OUT/r/12k.log 2>&1; echo "12k rc=$?" >> $OUT/r/12k.log
timeout 150 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 1 --env RUNNER_ENGINE=ray \
    --workdir /tmp/bs-1515 --out $OUT/r/startup-h200-ray-delivery.json > $OUT/r/1515.log 2>&1; echo "1515 rc=$?" >> $OUT/r/1515.log
for f in 12k 1515; do echo "== $f"; tail -4 $OUT/r/$f.log | cut -c1-700; done
