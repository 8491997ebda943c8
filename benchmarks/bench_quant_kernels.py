"""Time W4A16 (w4a16_matmul) and W8A8 (int8_gemm) against bf16 F.linear on the Llama-3-8B layer GEMMs at decode batches.

    PYTHONPATH=. python benchmarks/bench_quant_kernels.py [--json results.json] [--sweep]

Per GEMM and batch (M = 1, 16, 64): microseconds per call as CUDA-graph replays (the engine runs decode in
graphs), each timed call reading its own copy of the weights (enough copies to exceed twice the L2), and the
achieved bandwidth (weight + activation + output bytes) against the device copy bandwidth measured first in
the same process. The layer totals sum qkv, o, gate_up and down: the goal is W4A16 >= 2.5x bf16 at M = 1 and
not slower at M = 16. --sweep also times other block shapes, split counts and the other AWQ kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_kernels import copy_bandwidth, graph_of, time_ms

from lmserve.kernels import split_k, w4a16
from lmserve.kernels.int8_gemm import int8_gemm, per_token_quant_int8
from lmserve.layers.quant import cuda_int8_matmul

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


def bench_gemm(k: int, n: int, m: int, w4_options: dict | None = None) -> dict:
    """bf16, W4A16 and int8 timings of one [m, k] x [k, n] product; w4_options go to w4a16_matmul (sweeps)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    row: dict = {"k": k, "n": n, "m": m}
    io_bytes = m * k * 2 + m * n * 2
    sweeping = w4_options is not None
    if not sweeping:
        sets = num_sets_for(weight_bytes("bf16", k, n))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        row["bf16_us"] = graph_us([lambda w=w: F.linear(x, w) for w in dense])
        del dense
    sets = num_sets_for(weight_bytes("awq", k, n))
    packed = [awq_weights(k, n) for _ in range(sets)]
    repacked = [w4a16.repack_awq(**p, group_size=GROUP_SIZE) for p in packed]
    row["awq_us"] = graph_us([lambda w=w: w4a16.w4a16_matmul(x, w, **(w4_options or {})) for w in repacked])
    del packed, repacked
    if not sweeping:
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
        row["int8_cublas_us"] = graph_us([lambda w=w: cuda_int8_matmul(x_q, w) for w, _ in int8])
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
        for key in ("bf16_us", "awq_us", "int8_gemm_us", "int8_cublas_us", "w8a8_us"):
            per_m[key] = per_m.get(key, 0.0) + row.get(key, math.nan)
    return totals


def print_rows(rows: list[dict], copy_tb_s: float) -> None:
    print(
        f"{'gemm':8s} {'M':>3s} {'bf16_us':>8s} {'TB/s':>5s} {'awq_us':>8s} {'TB/s':>5s} {'%copy':>5s} "
        f"{'x bf16':>6s} {'int8_us':>8s} {'TB/s':>5s} {'x bf16':>6s} {'cublas8':>8s} {'w8a8_us':>8s}  w4 kernel"
    )
    for r in rows:
        print(
            f"{r['name']:8s} {r['m']:3d} {r['bf16_us']:8.1f} {r['bf16_tb_s']:5.2f} {r['awq_us']:8.1f} "
            f"{r['awq_tb_s']:5.2f} {100 * r['awq_tb_s'] / copy_tb_s:5.1f} {r['bf16_us'] / r['awq_us']:6.2f} "
            f"{r['int8_gemm_us']:8.1f} {r['int8_gemm_tb_s']:5.2f} "
            f"{r['bf16_us'] / r['int8_gemm_us']:6.2f} {r['int8_cublas_us']:8.1f} {r['w8a8_us']:8.1f}  {r['awq_kernel']}"
        )


def awq_choice(m: int, k: int, n: int) -> str:
    """Which W4A16 kernel and split the default dispatch takes, for the table."""
    num_blocks = math.ceil(k / w4a16.BLOCK_ROWS)
    if m <= w4a16.GEMV_MAX_ROWS:
        opts = w4a16.gemv_options(n)
        tiles = math.ceil(n / opts["block_n"])
        kernel = "gemv"
    elif m <= w4a16.DOT_MAX_ROWS:
        opts = w4a16.dot_options(m, n)
        tiles = math.ceil(m / opts["block_m"]) * math.ceil(n / opts["block_n"])
        kernel = f"dot bm={opts['block_m']}"
    else:
        return "dense"
    per_split = split_k.choose_splits(tiles, num_blocks, opts["programs_per_sm"], torch.device("cuda"))
    return f"{kernel} bn={opts['block_n']} split={math.ceil(num_blocks / per_split)}"


def _grid(**axes: list) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


SWEEP = {
    1: [
        {"kernel": "gemv", "block_n": bn, "num_warps": warps, "prefetch": prefetch, "programs_per_sm": pps}
        for bn, warps in [(32, 2), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8)]
        for prefetch in (0, 1)
        for pps in (4, 8)
    ],
}  # fmt: skip


def run_sweep(rows: list[dict]) -> list[dict]:
    """Each variant over the whole layer at its batch size, beside the default's layer total."""
    results = []
    default_us = layer_totals(rows)
    for m, variants in SWEEP.items():
        for options in variants:
            try:
                parts = {name: bench_gemm(k, n, m, options)["awq_us"] for name, (k, n) in LAYER.items()}
                total = sum(parts.values())
            except Exception as error:  # a variant the compiler or the device refuses: report, go on
                print(f"sweep M={m} {options}: failed: {str(error).splitlines()[0][:160]}")
                continue
            results.append({"m": m, "options": options, "layer_awq_us": total, "parts_us": parts})
            print(
                f"sweep M={m:3d} {json.dumps(options):90s} layer {total:7.1f} us "
                f"({' '.join(f'{v:.1f}' for v in parts.values())}) "
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
            f"int8 {total['int8_gemm_us']:7.1f} us "
            f"({total['bf16_us'] / total['int8_gemm_us']:.2f}x, cuBLAS int8 {total['int8_cublas_us']:.1f})  "
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
