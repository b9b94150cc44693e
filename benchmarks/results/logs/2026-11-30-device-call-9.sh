#!/usr/bin/env bash
# Device call 9 (x2): issue 19's per-token CRC A/B (GPU 0) and where an actor's start goes (GPU 1).
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
( CUDA_VISIBLE_DEVICES=0 timeout 500 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 \
    --outputs per_token_fp16,per_token_fp16_nocrc --repeats 2 --cpu-check 0 --out $OUT/r/crcab/ > $OUT/r/crc-ab.log 2>&1; echo "crc rc=$?" >> $OUT/r/crc-ab.log ) &
( CUDA_VISIBLE_DEVICES=1 timeout 400 python3 build/gpu/profile_actor.py driver /tmp/esm2_650M_fp32.pt > $OUT/r/profile.log 2>&1; echo "profile rc=$?" >> $OUT/r/profile.log ) &
wait
tail -30 $OUT/r/profile.log; tail -12 $OUT/r/crc-ab.log; ls $OUT/r/crcab
