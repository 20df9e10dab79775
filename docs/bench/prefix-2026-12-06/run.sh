#!/bin/sh
# The measurements of README.md here, one at a time, each bounded by `timeout` (at most
# 26 minutes in all; fewer on a quiet machine). Run from the repository root:
#   sh docs/bench/prefix-2026-12-06/run.sh
# Each bench writes its JSON and prints its table to NAME.txt beside it.
# Nothing else should run meanwhile: on a busy machine torch's two threads wait on each other
# in every op, and small chunk steps suffer most (README.md, "Noise").
set -u
OUT=docs/bench/prefix-2026-12-06
TP=${TOKENPOOL:-.venv/bin/tokenpool}
run() {  # run LIMIT_S COMMAND...: a failure or a timeout is reported, and the rest still run
  limit=$1; shift
  timeout "$limit" "$@" || echo "run.sh: exit $? from: $*" >&2
}
# 1. Multi-turn chat over the default fleet's six SmolLM2 aliases on its 2 workers, on two
#    fresh servers: prefix caching on, then off (the same 36 turns).
run 480 $TP bench chat --sessions 12 --turns 3 --concurrency 4 --system-tokens 1000 \
    --user-tokens 40 --max-tokens 32 --log-dir $OUT/logs --json $OUT/chat.json > $OUT/chat.txt
# 2. A 4,000-token prompt while 16 streams decode, chunked prefill on (budget 512) and off.
run 180 $TP bench chunked --prompt-tokens 4000 --streams 16 --budget 512 \
    --json $OUT/chunked-512.json > $OUT/chunked-512.txt
# 3. The same with smaller chunks (budget 128): shorter gaps, a later first token.
run 180 $TP bench chunked --prompt-tokens 4000 --streams 16 --budget 128 \
    --json $OUT/chunked-128.json > $OUT/chunked-128.txt
# 4. The chat open loop: sessions start at 0.1-0.4 per second for 40 s (3 turns each), on a
#    fresh server per rate and setting (8 points, each at most ~10 s start + 40 s + 30 s grace);
#    SLO attainment per point and the sustainable rate, caching on against off.
run 720 $TP bench chat --rates 0.1,0.2,0.3,0.4 --duration 40 --grace 30 --turns 3 \
    --system-tokens 1000 --user-tokens 40 --max-tokens 32 --log-dir $OUT/logs \
    --json $OUT/chat-rates.json > $OUT/chat-rates.txt
