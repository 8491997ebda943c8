#!/bin/bash
# Device A/B of LMSERVE_PDL (run from the repository root; wheels in ${WHL:-.whl}): decode-only sweeps (bf16, AWQ,
# FP8) off then on, the 256 x 512/256 jobs (bf16, FP8) off then on, then the GPU tests most exposed to ordering with
# PDL on. Results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL:-.whl}/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LMSERVE_CACHE_DIR=/tmp/lc
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
t0=$SECONDS
stamp() { echo "== $1 at $((SECONDS - t0)) s"; }
for pdl in 0 1; do
  stamp "sweep pdl=$pdl"
  LMSERVE_PDL=$pdl timeout 200 python3 benchmarks/gpu_sweep.py --skip-hf --decode-only --quant --formats awq fp8 \
    --json $OUT/sweep_pdl$pdl.json 2>&1 | grep -v Warning | tail -1 | cut -c1-600
done
for pdl in 0 1; do
  stamp "jobs pdl=$pdl"
  mkdir -p $OUT/job_pdl$pdl
  LMSERVE_PDL=$pdl timeout 120 python3 benchmarks/job_profile.py --formats bf16 fp8 --repeats 2 --no-profile \
    --out-dir $OUT/job_pdl$pdl 2>&1 | grep -v Warning | tail -4
done
stamp "tests pdl=1"
LMSERVE_PDL=1 timeout $((570 - (SECONDS - t0))) python3 -m pytest -q -n 4 -p no:cacheprovider -x \
  tests/gpu/test_w4_gemv_cuda.py tests/gpu/test_fp8_gpu.py tests/gpu/test_greedy_gpu.py tests/gpu/test_kernels.py \
  2>&1 | tail -15 | tee $OUT/tests_pdl1.txt
stamp done
