#!/usr/bin/env bash
# Issue 17's next GPU round in device-sized calls (each fits the device tool's 600 s limit on an H200/H100):
#   bash benchmarks/issue17_round.sh tests    # tests/gpu in full (~100-230 s), the new fusion tests first
#   bash benchmarks/issue17_round.sh sweep    # batch-1 decode per format, with and without each decode fusion
#   bash benchmarks/issue17_round.sh jobs     # the decode-attention job sweep, then the 256 x 512/256 jobs
#   bash benchmarks/issue17_round.sh gemv [all [S]]  # W4A16 CUDA GEMV: tests, per-GEMM sweep, batch 1 (+ tests/gpu)
# Results go to $OUT (the device tool's folder; ./out here). A checkout without lmserve's serving deps installed
# (the device machine) gets them from .whl/ when that folder holds the wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 LMSERVE_CACHE_DIR="${LMSERVE_CACHE_DIR:-/tmp/lc}"
(nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv,noheader; date -u) > "$OUT/machine.txt"
cat "$OUT/machine.txt"

case "${1:-}" in
  tests)
    timeout 150 python3 -m pytest -q -x tests/gpu/test_decode_fusion_gpu.py tests/gpu/test_norm_fusion_gpu.py \
      tests/gpu/test_w4_gemv_cuda.py -n 8 -p no:cacheprovider > "$OUT/tests_new.txt" 2>&1
    tail -5 "$OUT/tests_new.txt"
    timeout 400 python3 -m pytest -q tests/gpu -n 8 -p no:cacheprovider > "$OUT/tests_gpu.txt" 2>&1
    tail -15 "$OUT/tests_gpu.txt"
    ;;
  sweep)
    # bf16 runs first in every sweep; each fusion beside its unfused format in the same call
    timeout 560 python3 benchmarks/gpu_sweep.py --skip-hf --decode-only --quant --json "$OUT/sweep.json" \
      --formats bf16+fuseattn bf16+fusenorm awq awq+fuseattn awq+fusenorm awq+fuseattn+fusenorm+lmfp8 \
      fp8 fp8+fuseattn fp8+fuseattn+lmfp8 > "$OUT/sweep_log.txt" 2>&1
    grep -E '"(bf16|[a-z0-9+]+_bs1)_decode_tok_per_s|graph_replay_ms_bs1' "$OUT/sweep.json" | head -40
    ;;
  jobs)
    timeout 150 python3 benchmarks/bench_kernels.py --job-sweep --json "$OUT/job_sweep.json" \
      > "$OUT/job_sweep_log.txt" 2>&1
    tail -3 "$OUT/job_sweep_log.txt"
    timeout 400 python3 benchmarks/job_profile.py --formats bf16 bf16+fuseattn fp8 fp8+lmfp8 --repeats 2 \
      --no-profile --out-dir "$OUT" > "$OUT/jobs_log.txt" 2>&1
    tail -8 "$OUT/jobs_log.txt"
    ;;
  gemv)
    # most wanted first (a call cut short still brings back what it wrote): the kernel's tests, batch 1 of this
    # tree and of the trees before it, then the per-GEMM sweep, then (all) more of tests/gpu
    timeout 150 python3 -m pytest -q -x tests/gpu/test_w4_gemv_cuda.py -n 8 -p no:cacheprovider \
      > "$OUT/tests_gemv.txt" 2>&1
    tail -3 "$OUT/tests_gemv.txt"
    timeout 200 python3 benchmarks/gpu_sweep.py --skip-hf --decode-only --quant --json "$OUT/sweep.json" \
      --formats awq awq+lmfp8 awq+fuserot+lmfp8 awq+occ3 > "$OUT/sweep_log.txt" 2>&1
    grep -E '"(bf16|[a-z0-9+]+_bs1)_decode_tok_per_s|graph_replay_ms_bs1|decode_step_ms' "$OUT/sweep.json" | head -40
    for base in .dev-base .dev-b2; do  # trees before, beside it in the same call (copies made with git archive)
      [ -d "$base/lmserve" ] || continue
      (cd "$base" && PYTHONPATH="/tmp/site:$PWD" timeout 110 python3 benchmarks/gpu_sweep.py --skip-hf \
        --decode-only --quant --json "$OUT/sweep${base#.dev}.json" --formats awq > "$OUT/sweep${base#.dev}_log.txt" 2>&1)
      echo "$base:"
      grep -E '"(bf16|[a-z0-9+]+_bs1)_decode_tok_per_s|graph_replay_ms_bs1' "$OUT/sweep${base#.dev}.json"
    done
    (cd benchmarks && timeout 120 python3 bench_decode_gemms.py --cuda-gemv --json "$OUT/gemv_sweep.json") \
      > "$OUT/gemv_sweep_log.txt" 2>&1
    grep -E "best|layer" "$OUT/gemv_sweep_log.txt" | head -30
    if [ "${2:-}" = "all" ]; then  # then tests/gpu (TESTS_K: those it names), in what time the call has left
      timeout "${3:-200}" python3 -m pytest -q tests/gpu -n 8 -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
        > "$OUT/tests_gpu.txt" 2>&1
      tail -6 "$OUT/tests_gpu.txt"
    fi
    ;;
  *)
    echo "usage: $0 tests|sweep|jobs|gemv" >&2
    exit 2
    ;;
esac
