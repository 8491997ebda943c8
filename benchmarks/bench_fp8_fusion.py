"""Time the FP8 linears' input kernels, fused (norm / SiLU-and-mul writing e4m3 rows) against the unfused pair
(the 16-bit kernel, then per_token_quant_fp8), at the 256 x 512/256 job's prefill chunk and decode batch.

    PYTHONPATH=. python benchmarks/bench_fp8_fusion.py [--json results.json]

Bytes: the fused kernels' reads and writes (the floor of both variants); medians of CUDA-event timings over
inputs that rotate through more than L2. At 256 rows the kernels take a few microseconds and do_bench times the
Python launch path (tens of microseconds): use the job's profile (benchmarks/job_profile.py) for those; the 8192-row
numbers are GPU time.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from triton.testing import do_bench

from lmserve.kernels.activation import silu_and_mul, silu_and_mul_fp8
from lmserve.kernels.fp8 import per_token_quant_fp8
from lmserve.kernels.rmsnorm import fused_add_rms_norm

HIDDEN, INTERMEDIATE = 4096, 14336
L2_BYTES = 60 * 2**20


def rotating(make: Callable[[], Any], bytes_each: int) -> Callable[[], Any]:
    """A source of inputs that cycles through enough copies to exceed L2."""
    copies = [make() for _ in range(max(2, -(-3 * L2_BYTES // bytes_each)))]
    state = {"i": 0}

    def next_input() -> Any:
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_input


def bench(fn: Callable[[], Any]) -> float:
    return 1000 * do_bench(fn, warmup=25, rep=100, return_mode="median")  # microseconds


def norm_case(rows: int) -> dict[str, float]:
    weight = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    source = rotating(
        lambda: (
            torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16),
            torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16),
        ),
        4 * rows * HIDDEN,
    )

    def unfused() -> None:
        x, residual = source()
        per_token_quant_fp8(fused_add_rms_norm(x, residual, weight, 1e-5)[0])  # type: ignore[arg-type]

    def fused() -> None:
        x, residual = source()
        fused_add_rms_norm(x, residual, weight, 1e-5, fp8=True)

    floor_bytes = rows * HIDDEN * (2 + 2 + 2 + 1)  # x, residual read; residual, e4m3 written
    return {"unfused_us": bench(unfused), "fused_us": bench(fused), "floor_bytes": floor_bytes}


SILU_WARPS = (8, 16, 32)
"""num_warps of silu_and_mul_fp8 to time beside its default."""


def silu_case(rows: int) -> dict[str, float]:
    source = rotating(
        lambda: torch.randn(rows, 2 * INTERMEDIATE, device="cuda", dtype=torch.bfloat16),
        4 * rows * INTERMEDIATE,
    )
    result = {
        "unfused_us": bench(lambda: per_token_quant_fp8(silu_and_mul(source()))),
        "fused_us": bench(lambda: silu_and_mul_fp8(source())),
        "floor_bytes": rows * INTERMEDIATE * (4 + 1),
    }
    for w in SILU_WARPS:
        result[f"fused_w{w}_us"] = bench(partial(lambda num_warps: silu_and_mul_fp8(source(), num_warps), w))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 8192])
    args = parser.parse_args()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    for rows in args.rows:
        results[f"norm_{rows}"] = norm_case(rows)
        results[f"silu_{rows}"] = silu_case(rows)
    for name, case in list(results.items()):
        if isinstance(case, dict):
            tb_s = case["floor_bytes"] / case["fused_us"] / 1e6
            print(
                f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in case.items() if k != "floor_bytes"), end=""
            )
            print(f"  (fused {tb_s:.2f} TB/s of the floor bytes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
