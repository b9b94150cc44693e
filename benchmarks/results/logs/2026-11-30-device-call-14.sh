#!/usr/bin/env bash
# Device call 14 (x2, ~9 min; after call 13): the per-token CRC A/B (ISA-L) in the no-CRC-first order on GPU 0; on GPU 1 the CRC-first
# order again (a second pair); the CRC's CPU cost and contention proxy on the host's CPU.
source .devsite/activate && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p $OUT/r
( CUDA_VISIBLE_DEVICES=0 timeout 520 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 \
    --outputs per_token_fp16_nocrc,per_token_fp16 --repeats 2 --cpu-check 0 --out $OUT/r/crcab-isal-b/ > $OUT/r/crc-ab-b.log 2>&1
  echo "crc rc=$?" >> $OUT/r/crc-ab-b.log ) &
( CUDA_VISIBLE_DEVICES=1 timeout 520 python3 scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 \
    --outputs per_token_fp16,per_token_fp16_nocrc --repeats 2 --cpu-check 0 --out $OUT/r/crcab-isal-c/ > $OUT/r/crc-ab-c.log 2>&1
  echo "crc rc=$?" >> $OUT/r/crc-ab-c.log ) &
wait
CUDA_VISIBLE_DEVICES= timeout 60 python3 scripts/bench_checksum.py --per-token --tokens 65536 --dim 1280 --dtype float16 --repeats 7 \
    --out $OUT/r/checksum-cost-per-token-isal-h200host.json > $OUT/r/checksum.log 2>&1; echo "checksum rc=$?" >> $OUT/r/checksum.log
for f in crc-ab-b crc-ab-c; do grep -E "vs_pooled|rc=|per-token:" $OUT/r/$f.log | tail -6; done; tail -4 $OUT/r/checksum.log
