#!/usr/bin/env bash
# Device call 2 (x2): GPU0 = ESM C 300M/600M vs transformers EsmcModel; GPU1 = 650M main path vs the packed reference, then GPU tests.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 545 python3 scripts/bench.py gpu --models esmc300,esmc600 --gpus 1 --shadow-rates 0 --cpu-check 0 \
    --reference build/bench_ref/reference_bench.py --out $OUT/r/esmc > $OUT/r/gpu0.log 2>&1
  echo "esmc bench rc=$?" >> $OUT/r/gpu0.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 260 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 --cpu-check 0 \
    --reference build/bench_ref/reference_bench.py --ref-modes packed16 --ref-seqs 650M=4000 --out $OUT/r/e2e > $OUT/r/gpu1.log 2>&1
  echo "650M bench rc=$?" >> $OUT/r/gpu1.log
  timeout 270 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_console.py tests/test_gpu_pipeline.py tests/test_dnabert.py > $OUT/r/gpu1-tests.log 2>&1
  echo "gpu tests rc=$?" >> $OUT/r/gpu1-tests.log
) &
wait
ls -laR $OUT/r | head -20
tail -30 $OUT/r/gpu0.log; tail -12 $OUT/r/gpu1.log; tail -25 $OUT/r/gpu1-tests.log
