"""Time W4A16 (awq_gemm) and W8A8 (int8_gemm) against bf16 F.linear on the Llama-3-8B layer GEMMs at decode batches.

    PYTHONPATH=. python benchmarks/bench_quant_kernels.py [--json results.json] [--sweep]

Per GEMM and batch (M = 1, 16, 64): microseconds per call as CUDA-graph replays (the engine runs decode in
graphs), each timed call reading its own copy of the weights (enough copies to exceed twice the L2), and the
achieved bandwidth (weight + activation + output bytes) against the device copy bandwidth measured first in
the same process. The layer totals sum qkv, o, gate_up and down: the goal is W4A16 >= 2.5x bf16 at M = 1 and
not slower at M = 16. --sweep also times other block shapes, split counts and the other AWQ kernel.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_kernels import copy_bandwidth, graph_of, time_ms

from lmserve.kernels import awq_gemm as awq
from lmserve.kernels.int8_gemm import int8_gemm, per_token_quant_int8

LAYER = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
"""Llama-3-8B GEMMs of one decoder layer as (in_features K, out_features N)."""
BATCHES = (1, 16, 64)
GROUP_SIZE = 128
L2_BYTES = 50 * 2**20
MAX_SETS = 16


def num_sets_for(bytes_per_set: int) -> int:
    return min(MAX_SETS, max(1, math.ceil(2 * L2_BYTES / bytes_per_set)))


def graph_us(calls: list[Callable[[], object]]) -> float:
    """Microseconds per call: one CUDA graph runs every call once (each on its own weights)."""
    graph = graph_of(calls, len(calls))
    return time_ms(graph.replay, iterations=20, warmup=3) * 1e3 / len(calls)


def awq_weights(k: int, n: int) -> dict[str, torch.Tensor]:
    return {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device="cuda"),
        "qzeros": torch.randint(
            -(2**31), 2**31 - 1, (k // GROUP_SIZE, n // 8), dtype=torch.int32, device="cuda"
        ),
        "scales": (torch.rand(k // GROUP_SIZE, n, device="cuda") * 0.01 + 0.002).half(),
    }


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """What a W8A8 linear runs per call: quantize the activations per token, then the int8 GEMM."""
    x_q, x_scale = per_token_quant_int8(x)
    return int8_gemm(x_q, weight, x_scale, weight_scale, x.dtype)


def weight_bytes(method: str, k: int, n: int) -> int:
    if method == "bf16":
        return k * n * 2
    if method == "awq":
        return k * n // 2 + (k // GROUP_SIZE) * n * 2 + (k // GROUP_SIZE) * n // 2
    return k * n + n * 4  # int8 weight + per-channel float32 scale


def bench_gemm(k: int, n: int, m: int, awq_options: dict | None = None) -> dict:
    """bf16, awq and int8 timings of one [m, k] x [k, n] product; awq_options go to awq_gemm (sweeps)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    row: dict = {"k": k, "n": n, "m": m}
    io_bytes = m * k * 2 + m * n * 2
    sets = num_sets_for(weight_bytes("bf16", k, n))
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    row["bf16_us"] = graph_us([lambda w=w: F.linear(x, w) for w in dense])
    del dense
    sets = num_sets_for(weight_bytes("awq", k, n))
    packed = [awq_weights(k, n) for _ in range(sets)]
    options = awq_options or {}
    row["awq_us"] = graph_us(
        [lambda p=p: awq.awq_gemm(x, **p, group_size=GROUP_SIZE, **options) for p in packed]
    )
    del packed
    if awq_options is None:
        sets = num_sets_for(weight_bytes("int8", k, n))
        int8 = [
            (
                torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
                torch.rand(n, 1, device="cuda"),
            )
            for _ in range(sets)
        ]
        x_q, x_scale = per_token_quant_int8(x)
        row["int8_gemm_us"] = graph_us(
            [lambda w=w, s=s: int8_gemm(x_q, w, x_scale, s, torch.bfloat16) for w, s in int8]
        )
        row["w8a8_us"] = graph_us([lambda w=w, s=s: w8a8_linear(x, w, s) for w, s in int8])
        del int8
    for method in ("bf16", "awq", "int8_gemm"):
        if f"{method}_us" in row:
            total = weight_bytes(method.removesuffix("_gemm"), k, n) + io_bytes
            row[f"{method}_tb_s"] = total / (row[f"{method}_us"] * 1e-6) / 1e12
    return row


def layer_totals(rows: list[dict]) -> dict[int, dict[str, float]]:
    totals: dict[int, dict[str, float]] = {}
    for row in rows:
        per_m = totals.setdefault(row["m"], {})
        for key in ("bf16_us", "awq_us", "int8_gemm_us", "w8a8_us"):
            per_m[key] = per_m.get(key, 0.0) + row.get(key, math.nan)
    return totals


def print_rows(rows: list[dict], copy_tb_s: float) -> None:
    print(
        f"{'gemm':8s} {'M':>3s} {'bf16_us':>8s} {'TB/s':>5s} {'awq_us':>8s} {'TB/s':>5s} {'%copy':>5s} "
        f"{'x bf16':>6s} {'int8_us':>8s} {'TB/s':>5s} {'x bf16':>6s} {'w8a8_us':>8s}  awq kernel"
    )
    for r in rows:
        print(
            f"{r['name']:8s} {r['m']:3d} {r['bf16_us']:8.1f} {r['bf16_tb_s']:5.2f} {r['awq_us']:8.1f} "
            f"{r['awq_tb_s']:5.2f} {100 * r['awq_tb_s'] / copy_tb_s:5.1f} {r['bf16_us'] / r['awq_us']:6.2f} "
            f"{r['int8_gemm_us']:8.1f} {r['int8_gemm_tb_s']:5.2f} {r['bf16_us'] / r['int8_gemm_us']:6.2f} "
            f"{r['w8a8_us']:8.1f}  {r['awq_kernel']}"
        )


def awq_choice(m: int, k: int, n: int) -> str:
    """Which AWQ kernel and split the default dispatch takes, for the table."""
    if m <= awq.GEMV_MAX_ROWS:
        col_blocks = math.ceil(n // 8 / 32)
        per_split = awq.choose_split(m * col_blocks, k // GROUP_SIZE, awq._GEMV_PROGRAMS_PER_SM, "cuda")
        return f"gemv split={math.ceil(k // GROUP_SIZE / per_split)}"
    blocks = awq.gemm_blocks(m, GROUP_SIZE)
    tiles = math.ceil(m / blocks["block_m"]) * math.ceil(n / blocks["block_n"])
    num_k_blocks = k // blocks["block_k"]
    per_split = awq.choose_split(tiles, num_k_blocks, awq._GEMM_PROGRAMS_PER_SM, "cuda")
    return f"gemm bm={blocks['block_m']} split={math.ceil(num_k_blocks / per_split)}"


SWEEP = {
    1: [
        {"kernel": "gemv", "block_packed": 16},
        {"kernel": "gemv", "block_packed": 64, "block_k": 8},
        {"kernel": "gemv", "block_k": 32},
        {"kernel": "gemv", "num_warps": 8, "block_k": 32},
        {"kernel": "gemv", "num_warps": 2, "block_k": 8},
        {"kernel": "gemv", "blocks_per_split": 1},
        {"kernel": "gemv", "blocks_per_split": 4},
        {"kernel": "gemm"},
        {"kernel": "gemm", "block_n": 64},
    ],
    16: [
        {"kernel": "gemv"},
        {"kernel": "gemm", "block_n": 64},
        {"kernel": "gemm", "num_stages": 4},
        {"kernel": "gemm", "num_stages": 2},
        {"kernel": "gemm", "block_k": 128, "num_stages": 2},
        {"kernel": "gemm", "blocks_per_split": 4},
    ],
    64: [
        {"kernel": "gemm", "block_n": 64},
        {"kernel": "gemm", "num_stages": 4},
        {"kernel": "gemm", "block_m": 32},
    ],
}


def run_sweep(rows: list[dict]) -> list[dict]:
    """Each variant over the whole layer at its batch size, beside the default's layer total."""
    results = []
    default_us = layer_totals(rows)
    for m, variants in SWEEP.items():
        for options in variants:
            try:
                total = sum(bench_gemm(k, n, m, options)["awq_us"] for k, n in LAYER.values())
            except Exception as error:  # a variant the compiler or the device refuses: report, go on
                print(f"sweep M={m} {options}: failed: {str(error).splitlines()[0][:160]}")
                continue
            results.append({"m": m, "options": options, "layer_awq_us": total})
            print(
                f"sweep M={m:3d} {json.dumps(options):60s} layer awq {total:8.1f} us "
                f"(default {default_us[m]['awq_us']:.1f}, bf16 {default_us[m]['bf16_us']:.1f})"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--sweep", action="store_true", help="also time other AWQ block shapes and splits")
    args = parser.parse_args()
    copy_tb_s = copy_bandwidth() / 1e12
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {copy_tb_s:.2f} TB/s")
    rows = []
    for m in BATCHES:
        for name, (k, n) in LAYER.items():
            rows.append({"name": name, **bench_gemm(k, n, m), "awq_kernel": awq_choice(m, k, n)})
    print_rows(rows, copy_tb_s)
    totals = layer_totals(rows)
    goals = {1: 2.5, 16: 1.0}
    for m, total in totals.items():
        speedup = total["bf16_us"] / total["awq_us"]
        verdict = f"goal >= {goals[m]}x: {'met' if speedup >= goals[m] else 'NOT met'}" if m in goals else ""
        print(
            f"layer M={m:3d}: bf16 {total['bf16_us']:7.1f} us  awq {total['awq_us']:7.1f} us ({speedup:.2f}x)  "
            f"int8 {total['int8_gemm_us']:7.1f} us ({total['bf16_us'] / total['int8_gemm_us']:.2f}x)  "
            f"w8a8 incl. quant {total['w8a8_us']:7.1f} us  {verdict}"
        )
    sweep = run_sweep(rows) if args.sweep else []
    if args.json:
        result = {"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tb_s, "rows": rows}
        result |= {"layer_totals": {str(m): t for m, t in totals.items()}, "sweep": sweep}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
