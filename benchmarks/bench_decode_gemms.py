"""Decode-sized GEMMs of one Llama-3-8B layer per weight format and kernel, against cuBLAS bf16, on one GPU.

    PYTHONPATH=. python benchmarks/bench_decode_gemms.py [--json results.json] [--sweep] [--bf16-sweep]

Per format, microseconds per layer (qkv + o + gate_up + down) at M = 1, 2, 4, 8, 16, 64 as CUDA-graph replays,
each timed call on its own copy of the weights (more than twice the L2), from bench_quant_kernels' helpers:
- bf16: cuBLAS (F.linear) and, at M <= 16, our Triton GEMV (fp8_gemv's kernel over a bf16 weight);
- AWQ W4A16 g128: ours (w4a16_matmul) and torch's tinygemm (`_weight_int4pack_mm`, gpt-fast's int4 kernel) on the
  same integer weights (AutoAWQ's integer zeros as its float zeros (8 - z) * s);
- FP8 e4m3 per channel: fp8_gemv (M <= 16; one row on the CUDA C kernel where it builds) and per-token
  quantization + torch._scaled_mm (what ran before). --fp8-cuda sweeps the CUDA kernel's launch options.
Each kernel's output is checked against a float32 reference first. --sweep also times launch options of
fp8_gemv and of the W4A16 kernels at the row counts in W4_SWEEP / FP8_SWEEP. --bf16-sweep times, at one row, the
Triton GEMV over bf16 weights with the launch options of BF16_SWEEP against cuBLAS on the layer's GEMMs and the
lm_head (vocab 49152 and 128256), and the lm_head + greedy argmax as the sampler runs them (cuBLAS, widen, torch
argmax against the GEMV writing float32 logits and greedy_argmax).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_kernels import copy_bandwidth
from bench_quant_kernels import GROUP_SIZE, LAYER, awq_weights, graph_us, num_sets_for

from lmserve.kernels import w4a16
from lmserve.kernels.argmax import greedy_argmax
from lmserve.kernels.awq_dequant import awq_gemm_ref
from lmserve.kernels.fp8 import FP8, fp8_gemv, per_token_quant_fp8, quantize_rows_fp8
from lmserve.kernels.testing import relative_error

BATCHES = (1, 2, 4, 8, 16, 64)


def tinygemm_weight(awq: dict[str, torch.Tensor]) -> w4a16.TinyGemmWeight:
    return w4a16.tinygemm_pack(**awq, group_size=GROUP_SIZE)


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The FP8 path above fp8_gemv's rows: per-token e4m3 activations, cuBLASLt's scaled GEMM."""
    q, x_scale = per_token_quant_fp8(x)
    return torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale.t(), out_dtype=torch.bfloat16)


def timed(name: str, calls: list[Callable[[], object]], check: Callable[[], float] | None) -> dict:
    row: dict = {}
    try:
        if check is not None:
            row[f"{name}_err"] = check()
        row[f"{name}_us"] = graph_us(calls)
    except Exception as error:  # a kernel the device or torch refuses at this shape: say so, go on
        row[f"{name}_error"] = str(error).splitlines()[0][:200]
    return row


def bench_shape(k: int, n: int, m: int, sweep: bool) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    row: dict = {"k": k, "n": n, "m": m}
    sets = num_sets_for(k * n * 2)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
    ref = x.float() @ dense[0].float().t()
    row |= timed("bf16", [lambda w=w: F.linear(x, w) for w in dense], None)
    if m <= 16:
        row |= timed(
            "bf16_triton",
            [lambda w=w: fp8_gemv(x, w, None, None) for w in dense],
            lambda w=dense[0]: relative_error(fp8_gemv(x, w, None, None), ref),
        )
    del dense
    sets = num_sets_for(k * n // 2)
    awq = [awq_weights(k, n) for _ in range(sets)]
    ours = [w4a16.repack_awq(**a, group_size=GROUP_SIZE) for a in awq]
    awq_ref = awq_gemm_ref(x, **awq[0], group_size=GROUP_SIZE)
    row |= timed(
        "awq",
        [lambda w=w: w4a16.w4a16_matmul(x, w) for w in ours],
        lambda w=ours[0]: relative_error(w4a16.w4a16_matmul(x, w), awq_ref),
    )
    if sweep and m in W4_SWEEP:
        for options in W4_SWEEP[m]:
            label = "awq " + json.dumps(options)
            row |= timed(
                label,
                [lambda w=w, o=options: w4a16.w4a16_matmul(x, w, **o) for w in ours],
                lambda o=options, w0=ours[0]: relative_error(w4a16.w4a16_matmul(x, w0, **o), awq_ref),
            )
    del ours
    packs = [tinygemm_weight(a) for a in awq]
    row |= timed(
        "tinygemm",
        [lambda p=p: w4a16.tinygemm_matmul(x, p) for p in packs],
        lambda p=packs[0]: relative_error(w4a16.tinygemm_matmul(x, p), awq_ref),
    )
    del awq, packs
    sets = num_sets_for(k * n)
    fp8 = [quantize_rows_fp8(torch.randn(n, k, device="cuda") * 0.02) for _ in range(sets)]
    w0, s0 = fp8[0]
    fp8_ref = (x.float() @ w0.float().t()) * s0.t()
    row |= timed(
        "fp8_scaled_mm",
        [lambda w=w, s=s: scaled_mm_linear(x, w, s) for w, s in fp8],
        lambda: relative_error(scaled_mm_linear(x, w0, s0), fp8_ref),
    )
    if m <= 16:
        row |= timed(
            "fp8_gemv",
            [lambda w=w, s=s: fp8_gemv(x, w, s, None) for w, s in fp8],
            lambda: relative_error(fp8_gemv(x, w0, s0, None), fp8_ref),
        )
        if sweep and m in FP8_SWEEP:
            for options in FP8_SWEEP[m]:
                label = "fp8_gemv " + json.dumps(options)
                row |= timed(
                    label,
                    [lambda w=w, s=s, o=options: fp8_gemv(x, w, s, None, **o) for w, s in fp8],
                    lambda o=options: relative_error(fp8_gemv(x, w0, s0, None, **o), fp8_ref),
                )
    assert fp8[0][0].dtype == FP8
    return row


_W4_DOT_SWEEP = [
    {"kernel": "dot", "block_m": 16, "block_n": bn, "num_warps": 4, "programs_per_sm": pp, "num_stages": st}
    for bn in (64, 128) for pp in (4, 8) for st in (2, 3, 4)
]  # fmt: skip
W4_SWEEP = {
    1: [{"kernel": "gemv", "block_n": bn, "num_warps": nw, "programs_per_sm": pp, "prefetch": pf, "num_stages": 1}
        for bn in (64, 128) for nw in (4, 8) for pf in (0, 1) for pp in (4, 8, 16)]
       + [{"kernel": "gemv", "block_n": 64, "num_warps": 4, "programs_per_sm": 8, "num_stages": st} for st in (2, 3)],
    2: _W4_DOT_SWEEP,
    4: _W4_DOT_SWEEP,
    16: _W4_DOT_SWEEP + [{"kernel": "dot", "block_m": 16, "block_n": 256, "num_warps": 8, "num_stages": 3}],
}  # fmt: skip
FP8_SWEEP = {
    1: [{"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": 3, "programs_per_sm": pp, "use_dot": 0}
        for bn, bk in [(16, 512), (32, 256), (32, 512), (64, 256), (16, 1024)] for nw in (4, 8) for pp in (4, 8)]
       + [{"block_n": 32, "block_k": 256, "num_warps": 4, "num_stages": 4, "programs_per_sm": pp} for pp in (4, 8)],
    16: [{"block_n": bn, "block_k": bk, "num_warps": 4, "num_stages": 3, "programs_per_sm": pp}
         for bn, bk in [(16, 256), (32, 256), (32, 512), (64, 128)] for pp in (4, 8)],
}  # fmt: skip

CUDA_GEMV_SWEEP = (
    [{"kernel": "cuda", "blocks_per_cta": b, "prefetch": pf} for b in (8, 16, 32, 64) for pf in (0, 1)]
    + [{"kernel": "cuda", "blocks_per_cta": b, "occupancy": 3} for b in (4, 8, 11, 16, 22, 32, 64)]
    + [{"kernel": "cuda", "occupancy": 3}]
    + [{"kernel": "cuda"}, {"kernel": "gemv"}]
)
"""--cuda-gemv: the CUDA C GEMV (kernels/cuda/w4_gemv.cu) per blocks per CTA, register-staged (prefetching or not)
or held to 3 CTAs per SM (_o3), each default, and the Triton GEMV."""
FP8_CUDA_SWEEP = (
    [{"kernel": "cuda", "warps": 8, "unroll": u, "splits": 1, "pdl": pdl} for u in (2, 4) for pdl in (0, 1)]
    + [{"kernel": "cuda", "warps": 4, "unroll": 2, "splits": s, "pdl": 1} for s in (1, 2)]
    + [
        {"kernel": "cuda"},
        {"kernel": "triton"},
    ]
)
"""--fp8-cuda: the CUDA C FP8 GEMV (kernels/cuda/fp8_gemv.cu) per warps, unroll, splits and programmatic launch
(each call a programmatic dependent of the one before: PDL), its default, and the Triton GEMV."""

_SWAP_FULL = [(64, 4), (128, 4), (128, 8)]
W4_SWAP_SWEEP = {
    m: [{"kernel": "swap", "block_n": bn, "num_warps": nw, "num_stages": st, "programs_per_sm": pp, "fold": 1}
        for bn, nw in ((32, 1), (64, 1), (64, 2), (128, 2)) for st in (2, 3) for pp in (4, 8, 16)]
       + [{"kernel": "swap", "block_n": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4, "fold": 1}]
    for m in (1, 2, 4, 8, 16)
} | {
    64: [{"kernel": "swap", "block_m": bm, "block_n": bn, "num_warps": 4, "num_stages": st, "programs_per_sm": 4,
          "fold": fold} for bm in (32, 64) for bn in (64, 128) for st in (2, 3) for fold in (0, 1)]
}  # fmt: skip
"""The transposed tensor-core W4A16 kernel (weights as the dot's first operand), folded: with 1-2 warps Triton
builds it on Ampere-style mma.sync (both operands in registers, no wgmma waits), with 4 on Hopper's wgmma."""


LM_HEADS = {"lm_head": (4096, 49152), "lm_head_128k": (4096, 128256)}
"""Llama-3-8B-shaped lm_heads (K, vocab): the benchmark's 49152 (SmolLM2's tokenizer) and Llama-3's own."""
BF16_SWEEP = [
    {"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": st, "programs_per_sm": pp, "use_dot": 0}
    for bn in (8, 16, 32) for bk in (256, 512, 1024) for nw in (4, 8) for st in (2, 4) for pp in (4, 8, 16)
    if bn * bk <= 16384
] + [  # second H200 call: fewer programs per SM (no split-K at all) and 4-channel programs
    {"block_n": bn, "block_k": bk, "num_warps": 4, "num_stages": st, "programs_per_sm": pp, "use_dot": 0}
    for bn, bk, pps in [(4, 256, (1, 2, 4, 8)), (4, 512, (1, 2, 4, 8)), (4, 1024, (2, 4)), (8, 256, (1, 2)),
                        (8, 512, (1, 2)), (16, 256, (2,))]
    for pp in pps for st in (2, 4)
]  # fmt: skip


def bench_bf16_one_row(k: int, n: int) -> dict:
    """One row: cuBLAS against the Triton GEMV over the same bf16 weights, its defaults and BF16_SWEEP."""
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    row: dict = {"k": k, "n": n, "m": 1}
    dense = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(num_sets_for(k * n * 2))
    ]
    ref = x.float() @ dense[0].float().t()
    row |= timed("bf16", [lambda w=w: F.linear(x, w) for w in dense], None)
    row |= timed(
        "bf16_triton",
        [lambda w=w: fp8_gemv(x, w, None, None) for w in dense],
        lambda: relative_error(fp8_gemv(x, dense[0], None, None), ref),
    )
    for options in BF16_SWEEP:
        label = "bf16_triton " + json.dumps(options)
        row |= timed(label, [lambda w=w, o=options: fp8_gemv(x, w, None, None, **o) for w in dense], None)
    if n in (n for _, n in LM_HEADS.values()):
        row |= bench_lm_head(x, dense, ref)
    return row


def bench_lm_head(x: torch.Tensor, dense: list[torch.Tensor], ref: torch.Tensor) -> dict:
    """The greedy step after the model: logits, float32 logits, argmax; each way, then the argmax alone."""
    expected = ref.argmax(-1)
    row = timed(
        "lm_head_cublas_argmax",
        [lambda w=w: F.linear(x, w).float().argmax(-1) for w in dense],
        lambda: float(not torch.equal(F.linear(x, dense[0]).float().argmax(-1), expected)),
    )
    row |= timed(
        "lm_head_gemv_argmax",
        [lambda w=w: greedy_argmax(fp8_gemv(x, w, None, None, out_dtype=torch.float32)) for w in dense],
        lambda: float(
            not torch.equal(greedy_argmax(fp8_gemv(x, dense[0], None, None, torch.float32)), expected)
        ),
    )
    logits = [torch.randn(1, ref.shape[1], device="cuda") for _ in range(16)]
    row |= timed("argmax_torch", [lambda t=t: t.argmax(-1) for t in logits], None)
    row |= timed(
        "argmax_triton",
        [lambda t=t: greedy_argmax(t) for t in logits],
        lambda: float(not all(torch.equal(greedy_argmax(t), t.argmax(-1)) for t in logits)),
    )
    return row


def bf16_sweep() -> list[dict]:
    rows = []
    for name, (k, n) in (LAYER | LM_HEADS).items():
        row = {"name": name, **bench_bf16_one_row(k, n)}
        rows.append(row)
        swept = sorted((v, lab) for lab, v in row.items() if lab.endswith("_us") and " " in lab)
        plain = {lab: round(v, 1) for lab, v in row.items() if lab.endswith("_us") and " " not in lab}
        print(f"{name:12s} {plain}  errors {[f'{v:.1e}' for lab, v in row.items() if lab.endswith('_err')]}")
        for v, lab in swept[:5]:
            print(f"    sweep best: {v:7.1f} us  {lab}", flush=True)
    return rows


def layer_sums(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Per M, each timed label summed over the layer's four GEMMs (labels missing for any GEMM are left out)."""
    sums: dict[int, dict[str, float]] = {}
    for m in {r["m"] for r in rows}:
        per_m = [r for r in rows if r["m"] == m]
        labels = set.intersection(*(set(k for k in r if k.endswith("_us")) for r in per_m))
        sums[m] = {label: sum(r[label] for r in per_m) for label in sorted(labels)}
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--sweep", action="store_true", help="also time launch options (W4_SWEEP, FP8_SWEEP)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--bf16-sweep", action="store_true", help="only the one-row bf16 GEMV sweep")
    parser.add_argument(
        "--cuda-gemv",
        action="store_true",
        help="one row only: the CUDA C GEMV's blocks per CTA against Triton's",
    )
    parser.add_argument(
        "--fp8-cuda",
        action="store_true",
        help="one row only: the CUDA C FP8 GEMV's launch options against the Triton fp8_gemv",
    )
    parser.add_argument(
        "--swap-sweep", action="store_true", help="--sweep over the transposed tensor-core kernels' options"
    )
    args = parser.parse_args()
    if args.cuda_gemv:
        args.sweep, args.batches = True, [1]
        W4_SWEEP.clear()
        W4_SWEEP[1] = CUDA_GEMV_SWEEP
        FP8_SWEEP.clear()
    if args.fp8_cuda:
        args.sweep, args.batches = True, [1]
        W4_SWEEP.clear()
        FP8_SWEEP.clear()
        FP8_SWEEP[1] = FP8_CUDA_SWEEP
    if args.swap_sweep:
        args.sweep = True
        W4_SWEEP.clear()
        W4_SWEEP.update(W4_SWAP_SWEEP)
        FP8_SWEEP.clear()  # the transposed FP8 dot lost to fp8_gemv everywhere and was removed (RESULTS)
    copy_tb_s = copy_bandwidth() / 1e12
    print(
        f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {copy_tb_s:.2f} TB/s",
        flush=True,
    )
    if args.bf16_sweep:
        rows = bf16_sweep()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tb_s, "rows": rows},
                    f,
                    indent=1,
                )
        return
    rows = []
    for m in args.batches:
        for name, (k, n) in LAYER.items():
            row = {"name": name, **bench_shape(k, n, m, args.sweep)}
            rows.append(row)
            errors = {key: f"{v:.1e}" for key, v in row.items() if key.endswith("_err")}
            failures = {key: v for key, v in row.items() if key.endswith("_error")}
            print(f"M={m:3d} {name:8s} errors {errors} {failures or ''}", flush=True)
            plain = {
                lab[:-3]: round(v, 1) for lab, v in row.items() if lab.endswith("_us") and " " not in lab
            }
            print(f"    {plain}")
            for prefix in ("awq", "fp8_gemv"):
                swept = sorted(
                    (v, lab) for lab, v in row.items() if lab.startswith(prefix + " ") and lab.endswith("_us")
                )
                for v, lab in swept[:3]:
                    print(
                        f"    best {v:7.1f} us  {lab[:-3]}  err {row.get(lab[:-3] + '_err', -1):.1e}",
                        flush=True,
                    )
            worst = (
                max((v, lab) for lab, v in row.items() if lab.endswith("_err") and " " in lab)
                if any(lab.endswith("_err") and " " in lab for lab in row)
                else None
            )
            if worst:
                print(f"    worst sweep error {worst[0]:.1e} {worst[1]}")
    sums = layer_sums(rows)
    for m, per_label in sums.items():
        bf16 = per_label["bf16_us"]
        main_labels = [label for label in per_label if " " not in label]
        print(
            f"layer M={m:3d}: "
            + "  ".join(
                f"{lab[:-3]} {per_label[lab]:7.1f} us ({bf16 / per_label[lab]:.2f}x)" for lab in main_labels
            )
        )
        swept = sorted((v, lab) for lab, v in per_label.items() if " " in lab)
        for v, lab in swept[:6]:
            print(f"    sweep best: {v:7.1f} us  {lab}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tb_s, "rows": rows,
                       "layer_us": {str(m): s for m, s in sums.items()}}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
