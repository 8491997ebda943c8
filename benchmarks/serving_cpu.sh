#!/usr/bin/env bash
# HTTP vs offline on the CPU, in one run: the embedded SmolLM2, 16 concurrent streams, 128 in / 128 out.
# Offline `lmserve bench throughput`, then `serve api_server` with the engine core in a thread and in its own
# process, each under `lmserve bench serving`. The 1-minute load average is recorded before and after every
# figure (OUT_DIR/loadavg.json); a ratio to the offline figure is refused when the load moved by more than 0.5
# across the two figures (a shared machine did not give both the same CPU).
# Usage: benchmarks/serving_cpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/out/serving_cpu}"
LMSERVE="${LMSERVE:-.venv/bin/lmserve}"
PYTHON="${PYTHON:-.venv/bin/python}"
PORT=23399
mkdir -p "$OUT"
export TQDM_DISABLE=1
load() { cut -d' ' -f1 /proc/loadavg; }
: >"$OUT/loadavg.txt"
record() { echo "$1 $2 $3" | tee -a "$OUT/loadavg.txt"; }  # figure, load before, load after

before=$(load)
"$LMSERVE" bench throughput --num-prompts 32 --concurrency 16 --input-len 128 --output-len 128 --json "$OUT/offline.json"
record offline "$before" "$(load)"
for mode in thread process; do
  "$LMSERVE" serve api_server --engine-core "$mode" --server-port "$PORT" --log-level ERROR &
  server=$!
  for _ in $(seq 1 240); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
  before=$(load)
  "$LMSERVE" bench serving --base-url "http://127.0.0.1:$PORT" --concurrency 16 --num-prompts 32 \
    --input-len 128 --output-len 128 --warmup 2 --json "$OUT/http_$mode.json"
  record "http_$mode" "$before" "$(load)"
  kill -INT "$server"; wait "$server" || true
done

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
loads = {name: (float(a), float(b)) for name, a, b in (line.split() for line in (out / "loadavg.txt").read_text().splitlines())}
offline = json.loads((out / "offline.json").read_text())["output_tok_per_s"]
for mode in ("thread", "process"):
    served = json.loads((out / f"http_{mode}.json").read_text())["output_tok_per_s"]
    span = [*loads["offline"], *loads[f"http_{mode}"]]
    if max(span) - min(span) > 0.5:
        print(f"http_{mode} / offline: refused, load average moved {min(span):.2f}..{max(span):.2f} (> 0.5)")
    else:
        print(f"http_{mode} / offline: {served / offline:.2f}x ({served:.1f} / {offline:.1f} output tok/s)")
PY
