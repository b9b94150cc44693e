#!/usr/bin/env bash
# Device call 15 (one H200, ~7 min): compile beside the first batches (c7eead0). The GPU tests of it (inductor on the
# compile thread beside eager FP16 batches; the fair-esm check with --compile-wait); then a 12,000-protein 650M job
# (~4.5M tokens: auto runs it on Ray and compiles) cold + warm, compiling beside (the default) and with --compile-wait.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
timeout 200 python3 -m pytest -m gpu -q -s -rs -p no:cacheprovider tests/test_compile_beside.py \
    "tests/test_gpu_pipeline.py::test_fp16_pipeline_matches_fair_esm_fp32" > $OUT/r/gpu-tests.log 2>&1; echo "gpu tests rc=$?" >> $OUT/r/gpu-tests.log
timeout 170 python3 scripts/bench_startup.py --arch 650M --seqs 12000 --gpus 1 --warm-runs 1 \
    --workdir /tmp/bs-beside --out $OUT/r/startup-h200-12k-compile-beside.json > $OUT/r/beside.log 2>&1; echo "beside rc=$?" >> $OUT/r/beside.log
timeout 190 python3 scripts/bench_startup.py --arch 650M --seqs 12000 --gpus 1 --warm-runs 1 --runner-arg=--compile-wait \
    --workdir /tmp/bs-wait --out $OUT/r/startup-h200-12k-compile-wait.json > $OUT/r/wait.log 2>&1; echo "wait rc=$?" >> $OUT/r/wait.log
grep -E "passed|failed|rc=|^FAILED|^E  |compiled beside|FP16 packed" $OUT/r/gpu-tests.log | tail -12 | cut -c1-400
for f in beside wait; do echo "== $f"; tail -4 $OUT/r/$f.log | cut -c1-700; done
python3 - <<'PY'
import json, os
for name in ("beside", "wait"):
    path = f"{os.environ['OUT']}/r/startup-h200-12k-compile-{name}.json"
    if not os.path.exists(path):
        continue
    for run in json.load(open(path))["runs"]:
        print(name, run["mode"], "first", run.get("to_first_output_seconds"), "wall", run.get("wall_seconds"),
              "load", run.get("actor_load"))
PY
