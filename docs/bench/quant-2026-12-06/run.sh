#!/bin/sh
# The measurements of README.md here, in the order they ran (one at a time: 2 cores).
set -e
OUT=docs/bench/quant-2026-12-06
BENCH="tokenpool bench engine --batch 1,8,32 --prompt-lens 64-256 --new-tokens 32 --threads 2"
for q in none int8 int4 native; do
  $BENCH --model smollm2-135m-instruct --dtype float32 --quant $q --json $OUT/engine-f32-$q.json
done
$BENCH --model smollm2-135m-instruct --dtype bfloat16 --quant none --json $OUT/engine-bf16-none.json
$BENCH --model smollm2-135m-instruct --dtype bfloat16 --quant native --no-hf \
    --json $OUT/engine-bf16-native.json
$BENCH --config $OUT/fleet-q8_0.yaml --model smollm2-q8_0 --dtype float32 --quant native \
    --json $OUT/engine-f32-q8_0.json
for q in none native int8 int4; do
  tokenpool bench swap --models smollm2-135m-instruct,smollm2-135m-support --dtype bfloat16 \
      --quant $q --repeats 20 --no-hf --json $OUT/swap-bf16-$q.json
done
