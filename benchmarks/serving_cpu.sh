#!/usr/bin/env bash
# HTTP vs offline on the CPU, in one run: the embedded SmolLM2, 16 concurrent streams, 128 in / 128 out.
# Offline `lmserve bench throughput`, then `serve api_server` with the engine core in a thread and in its own
# process, each under `lmserve bench serving`. The load average is printed beside every figure.
# Usage: benchmarks/serving_cpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/out/serving_cpu}"
LMSERVE="${LMSERVE:-.venv/bin/lmserve}"
PORT=23399
mkdir -p "$OUT"
export TQDM_DISABLE=1
load() { echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/loadavg.txt"; }

load
"$LMSERVE" bench throughput --num-prompts 32 --concurrency 16 --input-len 128 --output-len 128 --json "$OUT/offline.json"
for mode in thread process; do
  "$LMSERVE" serve api_server --engine-core "$mode" --server-port "$PORT" --log-level ERROR &
  server=$!
  for _ in $(seq 1 240); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
  load
  "$LMSERVE" bench serving --base-url "http://127.0.0.1:$PORT" --concurrency 16 --num-prompts 32 \
    --input-len 128 --output-len 128 --warmup 2 --json "$OUT/http_$mode.json"
  kill -INT "$server"; wait "$server" || true
done
load
