"""Quantized (int8 / int4 / fp8) vs bf16 KV attention on one GPU: decode and prefill, one layer of Llama-3-8B heads.

    PYTHONPATH=. python benchmarks/bench_kv_quant.py [--json OUT] [--no-sweep]
        [--batches 64 --context 4096 --policies 0 fp8 8 --no-prefill]   # long contexts, FP8 beside bf16

Decode: batch 32 / 128 / 256 sequences with a ~600-token context (512 prompt + a mid-generation 88), one
backend forward each (store of the new token + attention, what the engine runs per layer; int4 includes its
Hadamard rotations), timed as CUDA-graph replays over enough disjoint block sets to exceed L2. The int8
decode kernel is also swept over tile size and warps (--no-sweep skips it): the best row says which
defaults to keep. Prefill: 16 fresh 512-token prompts (one 8,192-token chunk), backend forward, eager, and
the old int8 path (dequantize the blocks into a bf16 copy, then the bf16 kernel) for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.bench_kernels import graph_of, time_ms
from lmserve.attention.kv_fp8 import to_fp8
from lmserve.attention.kv_quant import QuantizedKVCache, TritonQuantKVBackend, compact_block_tables
from lmserve.attention.metadata import AttentionMetadata, SequenceChunk, build_step_batch
from lmserve.attention.triton_backend import TritonAttentionBackend, TritonFP8KVBackend
from lmserve.cli.engine_args import parse_quant_policy
from lmserve.kernels.decode_attention import paged_decode_attention
from lmserve.kernels.kv_quant import dequantize_blocks, paged_decode_attention_quant, quantize_kv_ref
from lmserve.kernels.prefill_attention import paged_prefill_attention

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 64
CONTEXT_LEN, PROMPT_LEN, NUM_PROMPTS = 600, 512, 16
BATCHES = (32, 128, 256)
L2_BYTES = 50 * 2**20
SCALE = HEAD_DIM**-0.5
CUDA = torch.device("cuda")


def kv_bytes_per_token(policy: int | str) -> float:
    """K + V bytes of one token and layer, the float16 (scale, zero) pairs of int8 / int4 included."""
    if policy == "fp8":
        return 2 * NUM_KV_HEADS * HEAD_DIM
    per_head = HEAD_DIM * 2 if policy == 0 else HEAD_DIM * int(policy) // 8 + 4
    return 2 * NUM_KV_HEADS * per_head


def make_cache(policy: int | str, num_blocks: int) -> Any:
    plain = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16)
    if policy == "fp8":
        return to_fp8(plain)
    return plain if policy == 0 else QuantizedKVCache(*quantize_kv_ref(plain, int(policy)), int(policy))


def backend_of(policy: int | str) -> Any:
    if policy == "fp8":
        return TritonFP8KVBackend()
    return TritonAttentionBackend() if policy == 0 else TritonQuantKVBackend(int(policy))


def decode_metadata(tables: torch.Tensor, seq_len: int) -> AttentionMetadata:
    chunks = [SequenceChunk([0], seq_len - 1, table) for table in tables.tolist()]
    return build_step_batch(chunks, BLOCK_SIZE, CUDA).metadata


def decode_sets(
    batch: int, policy: int | str, context: int = CONTEXT_LEN
) -> tuple[list[AttentionMetadata], Any, int]:
    """Disjoint block tables, enough of them that one pass over all sets reads > 2x L2."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    bytes_per_set = int(batch * context * kv_bytes_per_token(policy))
    num_sets = max(1, math.ceil(2 * L2_BYTES / bytes_per_set))
    num_blocks = num_sets * batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device=CUDA).to(torch.int32).view(num_sets, batch, blocks_per_seq)
    metas = [decode_metadata(tables[i], context) for i in range(num_sets)]
    return metas, make_cache(policy, num_blocks), bytes_per_set


def graph_us(calls: list[Callable[[], Any]]) -> float:
    graph = graph_of(calls, len(calls))
    return time_ms(graph.replay, iterations=30) / len(calls) * 1e3


def bench_decode_backend(batch: int, policy: int | str, context: int = CONTEXT_LEN) -> dict[str, Any]:
    metas, cache, bytes_per_set = decode_sets(batch, policy, context)
    backend = backend_of(policy)
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16) for _ in "kv")
    plans = [backend.prepare(meta) for meta in metas]
    us = graph_us([lambda plan=plan: backend.forward(q, k, v, cache, plan, SCALE) for plan in plans])
    return {"kind": "decode_backend", "policy": policy, "batch": batch, "context": context,
            "us": us, "kv_tb_s": bytes_per_set / (us * 1e-6) / 1e12}  # fmt: skip


def bench_decode_kernel(
    batch: int, bits: int | str, block_n: int, num_warps: int, context: int = CONTEXT_LEN
) -> dict[str, Any]:
    """One decode-kernel config: the int8 / int4 kernel, or the plain one over a bf16 (0) or e4m3 (fp8) cache."""
    metas, cache, bytes_per_set = decode_sets(batch, bits, context)
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16)
    out = torch.empty_like(q)

    def call(meta: AttentionMetadata) -> Callable[[], Any]:
        if bits in (0, "fp8"):
            return lambda: paged_decode_attention(
                q, cache[0], cache[1], meta.block_tables, meta.seq_lens, SCALE, out=out, block_n=block_n,
                num_warps=num_warps,
            )  # fmt: skip
        return lambda: paged_decode_attention_quant(
            q, cache.codes, cache.params, meta.block_tables, meta.seq_lens, SCALE, int(bits), out=out,
            block_n=block_n, num_warps=num_warps,
        )  # fmt: skip

    us = graph_us([call(meta) for meta in metas])
    return {"kind": "decode_kernel", "policy": bits, "batch": batch, "block_n": block_n,
            "num_warps": num_warps, "us": us, "kv_tb_s": bytes_per_set / (us * 1e-6) / 1e12}  # fmt: skip


def prefill_metadata() -> AttentionMetadata:
    blocks_per_seq = PROMPT_LEN // BLOCK_SIZE
    tables = torch.randperm(NUM_PROMPTS * blocks_per_seq, device=CUDA).to(torch.int32)
    chunks = [SequenceChunk([0] * PROMPT_LEN, 0, table) for table in tables.view(NUM_PROMPTS, -1).tolist()]
    return build_step_batch(chunks, BLOCK_SIZE, CUDA).metadata


def old_int8_prefill(q: torch.Tensor, cache: Any, meta: AttentionMetadata, out: torch.Tensor) -> None:
    """The int8 prefill before this change: dequantize every block of the chunk, then the bf16 kernel."""
    max_blocks = -(-meta.max_seq_len // BLOCK_SIZE)
    block_ids = meta.block_tables[:, :max_blocks].reshape(-1)
    compact = dequantize_blocks(cache.codes, cache.params, block_ids, cache.bits, q.dtype)
    tables = compact_block_tables(meta.num_seqs, max_blocks, q.device)
    paged_prefill_attention(
        q, compact[0], compact[1], tables, meta.seq_lens, meta.query_start_loc, SCALE,
        first_seq=0, num_seqs=meta.num_seqs, max_query_len=meta.max_query_len, out=out,
    )  # fmt: skip


def bench_prefill(policy: int | str, old_path: bool = False) -> dict[str, Any]:
    meta = prefill_metadata()
    num_tokens = NUM_PROMPTS * PROMPT_LEN
    cache, backend = make_cache(policy, NUM_PROMPTS * PROMPT_LEN // BLOCK_SIZE), backend_of(policy)
    q = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16)
    k, v = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16) for _ in "kv")
    out = torch.empty_like(q)
    if old_path:
        ms = time_ms(lambda: old_int8_prefill(q, cache, meta, out), iterations=20)
    else:
        plan = backend.prepare(meta)
        ms = time_ms(lambda: backend.forward(q, k, v, cache, plan, SCALE), iterations=20)
    name = "prefill_old_dequantize_copy" if old_path else "prefill_backend"
    return {"kind": name, "policy": policy, "prompts": NUM_PROMPTS, "prompt_len": PROMPT_LEN, "us": ms * 1e3}


def print_table(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        fields = "  ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in row.items())  # fmt: skip
        print(fields, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--no-sweep", action="store_true", help="skip the int8 decode-kernel config sweep")
    parser.add_argument("--no-prefill", action="store_true", help="decode rows only")
    parser.add_argument(
        "--sweep-policy",
        type=parse_quant_policy,
        default=8,
        help="the decode kernel the sweep tunes (8, 4, fp8, 0)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="decode batch sizes")
    parser.add_argument("--context", type=int, default=CONTEXT_LEN, help="decode context length (tokens)")
    parser.add_argument(
        "--policies", nargs="+", type=parse_quant_policy, default=[0, 8, 4, "fp8"], help="0 (bf16) first"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        decode = [bench_decode_backend(batch, policy, args.context) for policy in args.policies]
        for row in decode:
            row["speedup_vs_bf16"] = decode[0]["us"] / row["us"]
        if not args.no_sweep:
            sweep = [
                bench_decode_kernel(batch, args.sweep_policy, n, w, args.context)
                for n in (32, 64, 128)
                for w in (2, 4, 8)
            ]
            decode += [*sweep, {**min(sweep, key=lambda row: row["us"]), "kind": "decode_kernel_best"}]
        print_table(decode)
        rows += decode
    if not args.no_prefill:
        prefill = [bench_prefill(policy) for policy in args.policies]
        if not args.no_sweep:
            prefill.append(bench_prefill(8, old_path=True))
        for row in prefill:
            row["speedup_vs_bf16"] = prefill[0]["us"] / row["us"]
        print_table(prefill)
        rows += prefill
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
