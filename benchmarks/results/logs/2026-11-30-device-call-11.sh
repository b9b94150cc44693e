#!/usr/bin/env bash
# Device call 11 (x2): start-up, 650M on one H200, alone on the host; then GPU tests on both GPUs and the CPU
# quickstart on the host's CPU beside them.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
CUDA_VISIBLE_DEVICES=0 timeout 230 python3 scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 2 \
    --workdir /tmp/bench-startup --out $OUT/r/startup-h200.json > $OUT/r/startup.log 2>&1; echo "startup rc=$?" >> $OUT/r/startup.log
( CUDA_VISIBLE_DEVICES=0 timeout 210 python3 -m pytest -m gpu -q -rs --tb=short -p no:cacheprovider tests/test_startup.py \
      tests/test_gpu_pipeline.py tests/test_outputs_gpu.py > $OUT/r/gpu-tests-0.log 2>&1; echo "gpu tests 0 rc=$?" >> $OUT/r/gpu-tests-0.log ) &
( CUDA_VISIBLE_DEVICES=1 timeout 210 python3 -m pytest -m gpu -q -rs --tb=short -p no:cacheprovider tests/test_esm2.py tests/test_esmc.py \
      -k "shadow_math or gpu_fp16 or compiled" > $OUT/r/gpu-tests-1.log 2>&1; echo "gpu tests 1 rc=$?" >> $OUT/r/gpu-tests-1.log ) &
( CUDA_VISIBLE_DEVICES= timeout 200 python3 scripts/bench_startup.py --cpu --warm-runs 2 --workdir /tmp/bench-cpu \
      --out $OUT/r/cpu-quickstart-h200host.json > $OUT/r/cpu-startup.log 2>&1; echo "cpu startup rc=$?" >> $OUT/r/cpu-startup.log ) &
wait
for f in startup cpu-startup; do echo "== $f"; tail -5 $OUT/r/$f.log | cut -c1-900; done
for f in gpu-tests-0 gpu-tests-1; do echo "== $f"; grep -E "passed|failed|rc=|^FAILED|^ERROR|Error" $OUT/r/$f.log | tail -8; done
