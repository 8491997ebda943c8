"""Time paged decode attention (Llama-3-8B heads, 2k context) against the HBM copy bandwidth measured beside it.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--json results.json] [--sweep]
    PYTHONPATH=. python benchmarks/bench_kernels.py --job-sweep [--json results.json]

--job-sweep times the decode of the 256 x 512/256 job instead (256 sequences at 528, 640 and 768 tokens of context,
block size 64) over split counts, tiles, warps and stages.

Each timed call reads a different set of blocks (enough sets to exceed L2), the timings are CUDA-event medians of
CUDA-graph replays (the engine runs decode in graphs) and of eager calls; bytes = K and V of every context token
read once + q and out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from lmserve.attention.metadata import SequenceChunk, build_step_batch
from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.kernels.decode_attention import choose_num_splits, paged_decode_attention
from lmserve.kernels.prefill_attention import paged_prefill_attention

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, CONTEXT_LEN = 32, 8, 128, 2048
L2_BYTES = 50 * 2**20


def time_ms(fn, iterations: int = 50, warmup: int = 10) -> float:
    """Median of per-call CUDA-event timings."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iterations=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_block_tables(
    batch: int, block_size: int, num_sets: int, context_len: int = CONTEXT_LEN
) -> tuple[torch.Tensor, int]:
    """num_sets disjoint random block tables [num_sets, batch, blocks_per_seq]; returns them and num_blocks."""
    blocks_per_seq = -(-context_len // block_size)
    num_blocks = num_sets * batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int64).to(torch.int32)
    return tables.view(num_sets, batch, blocks_per_seq), num_blocks


def graph_of(calls, replays_per_call: int) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def bench_decode(batch: int, block_size: int, context_len: int = CONTEXT_LEN, **kernel_options) -> dict:
    bytes_kv = 2 * batch * context_len * NUM_KV_HEADS * HEAD_DIM * 2
    bytes_total = bytes_kv + 2 * batch * NUM_Q_HEADS * HEAD_DIM * 2
    num_sets = max(1, math.ceil(2 * L2_BYTES / bytes_kv))
    tables, num_blocks = make_block_tables(batch, block_size, num_sets, context_len)
    cache = torch.randn(
        2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16
    )
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    seq_lens = torch.full((batch,), context_len, device="cuda", dtype=torch.int32)
    scale = HEAD_DIM**-0.5

    def call(index: int):
        return lambda: paged_decode_attention(
            q, cache[0], cache[1], tables[index], seq_lens, scale, out=out, **kernel_options
        )

    eager_ms = statistics.median(time_ms(call(i), iterations=10) for i in range(num_sets))
    graph = graph_of([call(i) for i in range(num_sets)], num_sets)
    graph_ms = time_ms(graph.replay, iterations=30) / num_sets
    splits = kernel_options.get("num_splits") or choose_num_splits(
        batch, NUM_KV_HEADS, tables.shape[2] * block_size, q.device
    )
    return {
        "batch": batch, "block_size": block_size, "context_len": context_len, "num_splits": splits,
        "block_n": kernel_options.get("block_n", 64), "num_warps": kernel_options.get("num_warps", 4),
        "num_stages": kernel_options.get("num_stages", 2),
        "bytes": bytes_total, "eager_us": eager_ms * 1e3, "graph_us": graph_ms * 1e3,
        "graph_tb_s": bytes_total / (graph_ms * 1e-3) / 1e12,
    }  # fmt: skip


def bench_torch_reference(batch: int, block_size: int) -> float:
    """Microseconds per call of the torch backend's decode (gather + SDPA), the in-repo peer."""
    tables, num_blocks = make_block_tables(batch, block_size, 1)
    cache = torch.randn(
        2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16
    )
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    chunks = [SequenceChunk([0], CONTEXT_LEN - 1, table) for table in tables[0].tolist()]
    backend = TorchAttentionBackend()
    plan = backend.prepare(build_step_batch(chunks, block_size, "cuda").metadata)
    return time_ms(lambda: backend.decode(q, cache, plan, HEAD_DIM**-0.5), iterations=20) * 1e3


def bench_prefill(prompt_len: int = 2048, block_size: int = 64, **kernel_options) -> dict:
    """One fresh causal prompt through paged prefill attention (one layer): microseconds and TFLOP/s."""
    num_blocks = prompt_len // block_size
    cache = torch.randn(
        2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16
    )
    q = torch.randn(prompt_len, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32)[None]
    seq_lens = torch.tensor([prompt_len], device="cuda", dtype=torch.int32)
    starts = torch.tensor([0, prompt_len], device="cuda", dtype=torch.int32)
    ms = time_ms(
        lambda: paged_prefill_attention(
            q,
            cache[0],
            cache[1],
            tables,
            seq_lens,
            starts,
            HEAD_DIM**-0.5,
            0,
            1,
            prompt_len,
            **kernel_options,
        ),
        iterations=30,
    )
    flops = (
        2 * prompt_len * prompt_len * NUM_Q_HEADS * HEAD_DIM
    )  # causal half of QK^T and PV, 2 flops per MAC
    return {"prompt_len": prompt_len, "prefill_us": ms * 1e3, "tflop_s": flops / (ms * 1e-3) / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument(
        "--sweep", action="store_true", help="also try other tile sizes, warps and split counts"
    )
    parser.add_argument(
        "--job-sweep", action="store_true", help="the 256 x 512/256 job's decode shapes over launch settings"
    )
    args = parser.parse_args()
    copy_tb_s = copy_bandwidth() / 1e12
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {copy_tb_s:.2f} TB/s")
    if args.job_sweep:
        job_sweep(copy_tb_s, args.json)
        return
    rows = []
    for batch in (1, 32, 128):
        for block_size in (16, 64):
            variants = [{}]
            if args.sweep:
                variants += [
                    {"block_n": 32},
                    {"block_n": 128},
                    {"num_warps": 8},
                    {"num_warps": 2, "block_n": 32},
                ]
                variants += [
                    {"num_splits": s}
                    for s in (1, 4, 16, 32)
                    if s != choose_num_splits(batch, 8, 2048, "cuda")
                ]
                variants += [{"num_splits": 32, "block_n": 32}] if batch == 1 else []
            for options in variants:
                row = bench_decode(batch, block_size, **options)
                row["fraction_of_copy"] = row["graph_tb_s"] / copy_tb_s
                rows.append(row)
            rows[-len(variants)]["torch_reference_us"] = bench_torch_reference(batch, block_size)
    header = "batch block splits block_n warps   MB  eager_us graph_us  TB/s  %copy  torch_ref_us"
    print(header)
    for r in rows:
        print(
            f"{r['batch']:5d} {r['block_size']:5d} {r['num_splits']:6d} {r['block_n']:7d} {r['num_warps']:5d} "
            f"{r['bytes'] / 1e6:5.0f} {r['eager_us']:9.1f} {r['graph_us']:8.1f} {r['graph_tb_s']:5.2f} "
            f"{100 * r['fraction_of_copy']:5.1f}  {r.get('torch_reference_us', float('nan')):9.1f}"
        )
    prefill = []
    prefill_variants = [{}, {"block_m": 128, "num_warps": 8}, {"block_m": 128, "block_n": 32, "num_warps": 4}]
    for options in prefill_variants + ([{"num_stages": 3}, {"block_n": 32}] if args.sweep else []):
        prefill.append({**options, **bench_prefill(**options)})
        print(
            f"prefill attention, one {prefill[-1]['prompt_len']}-token prompt, one layer, {options or 'default'}: "
            f"{prefill[-1]['prefill_us']:.1f} us = {prefill[-1]['tflop_s']:.0f} TFLOP/s (causal FLOPs)"
        )
    if args.json:
        write_rows(args.json, copy_tb_s, rows)


JOB_VARIANTS = (
    [{}]
    + [{"num_splits": s} for s in (1, 2, 3, 4)]
    + [
        {"num_splits": s, "block_n": n, "num_warps": w, "num_stages": st}
        for s in (1, 2)
        for n, w in ((64, 8), (128, 4), (128, 8), (32, 2), (32, 4))
        for st in (2, 3)
    ]
    + [{"num_splits": s, "num_stages": st} for s in (1, 2) for st in (1, 3, 4)]
    + [{"num_splits": s, "fused_reduce": True} for s in (2, 3, 4)]
)


def job_sweep(copy_tb_s: float, json_path: str | None) -> None:
    """256 sequences at the job's decode contexts (512 prompt + 16, 128, 256 generated), block size 64."""
    rows = []
    print("context splits block_n warps stages  graph_us  TB/s  %copy")
    for context_len in (528, 640, 768):
        for options in JOB_VARIANTS:
            row = bench_decode(256, 64, context_len, **options)
            row["fraction_of_copy"] = row["graph_tb_s"] / copy_tb_s
            row["options"] = options
            rows.append(row)
            print(
                f"{context_len:7d} {row['num_splits']:6d} {row['block_n']:7d} {row['num_warps']:5d} "
                f"{row['num_stages']:6d} {row['graph_us']:9.1f} {row['graph_tb_s']:5.2f} "
                f"{100 * row['fraction_of_copy']:5.1f}  {options or 'default'}",
                flush=True,
            )
    if json_path:
        write_rows(json_path, copy_tb_s, rows)


def write_rows(path: str, copy_tb_s: float, rows: list[dict]) -> None:
    with open(path, "w") as file:
        json.dump(
            {"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tb_s, "rows": rows}, file, indent=1
        )


if __name__ == "__main__":
    main()
