#!/usr/bin/env bash
# Device call 13 (one H200, ~6 min; alone on the host: start-up timings are noisy beside other work): the 1,515-protein
# 650M job's start-up with the in-process engine (auto picks it), cold + 2 warm; on Ray (--engine ray), cold + 1 warm;
# then the GPU tests (in-process on a GPU, the pipeline, start-up). Bundle: EXTRA_PACKAGES="isal==1.9.1" make-bundle.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
python3 -c "from runner.output.checksums import CRC32_IMPL; print('CRC', CRC32_IMPL)" > $OUT/r/crc-impl.txt 2>&1
timeout 120 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 2 \
    --workdir /tmp/bench-startup --out $OUT/r/startup-h200-in-process.json > $OUT/r/startup.log 2>&1; echo "startup rc=$?" >> $OUT/r/startup.log
timeout 130 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 1 --env RUNNER_ENGINE=ray \
    --workdir /tmp/bench-startup-ray --out $OUT/r/startup-h200-ray.json > $OUT/r/startup-ray.log 2>&1; echo "ray startup rc=$?" >> $OUT/r/startup-ray.log
timeout 250 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_in_process.py tests/test_gpu_pipeline.py \
    tests/test_startup.py > $OUT/r/gpu-tests.log 2>&1; echo "gpu tests rc=$?" >> $OUT/r/gpu-tests.log
cat $OUT/r/crc-impl.txt; for f in startup startup-ray; do echo "== $f"; tail -5 $OUT/r/$f.log | cut -c1-600; done
grep -E "passed|failed|rc=|^FAILED|^ERROR|min cosine" $OUT/r/gpu-tests.log | tail -8
