#!/usr/bin/env bash
# Serving speed: lmserve vs llama.cpp's server (llama-cpp-python) on the same GGUF, same machine, one run.
# Also the offline engine at concurrency 16, to show what the HTTP layer adds.
# Usage: PEER_PY=/path/to/venv-with-llama-cpp/bin/python benchmarks/serving_vs_llamacpp.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/out}"
PEER_PY="${PEER_PY:-/work/peer-venv/bin/python}"
LMSERVE=".venv/bin/lmserve"
mkdir -p "$OUT"
GGUF=$(.venv/bin/python -c "from lmserve.models.loader import resolve_model; print(resolve_model(None).gguf_path)")

wait_up() { for _ in $(seq 1 120); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; echo "server at $1 did not start"; exit 1; }
bench() {  # name url
  for c in 1 4 16; do
    n=$(( c < 4 ? 4 : c * 2 ))
    "$LMSERVE" bench serving --base-url "$2" --concurrency "$c" --num-prompts "$n" \
      --input-len 128 --output-len 128 --json "$OUT/$1_c$c.json"
  done
}

"$LMSERVE" serve api_server --server-port 23333 --log-level ERROR &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_up http://localhost:23333/health
bench lmserve http://localhost:23333
kill $SERVER; wait $SERVER 2>/dev/null || true

"$PEER_PY" -m llama_cpp.server --model "$GGUF" --port 8081 --n_threads 2 --n_ctx 4096 >/dev/null 2>&1 &
SERVER=$!
wait_up http://localhost:8081/v1/models
bench llamacpp http://localhost:8081
kill $SERVER; wait $SERVER 2>/dev/null || true

"$LMSERVE" bench throughput --num-prompts 32 --concurrency 16 --input-len 128 --output-len 128 --json "$OUT/offline_c16.json"
