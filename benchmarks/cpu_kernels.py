"""The CPU hot paths of a decode step, one op at a time, SmolLM2-135M shapes (bf16, 2 threads by default).

    PYTHONPATH=. python benchmarks/cpu_kernels.py [--threads 2] [--json OUT]

- GEMMs: `F.linear` (MKL over the plain weight) against oneDNN over its prepacked copy (`layers/cpu_gemm.py`)
  and torch's int4 / int8 weight-only kernels (`layers/linear.py`), per layer (qkv + o + gate_up + down) and for the
  tied lm_head, at 1 to 256 rows.
- Decode attention of B sequences of L tokens: the reference cache layout (`TorchAttentionBackend`) against the
  heads-first CPU layout (`CPUAttentionBackend`), gather + SDPA as a decode step runs them.
Each figure is the second best of 7 rounds (µs per call); the 1-minute load average is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from lmserve.attention.metadata import SequenceChunk, build_step_batch
from lmserve.attention.torch_backend import CPUAttentionBackend, TorchAttentionBackend, TorchPlan
from lmserve.layers.cpu_gemm import onednn_available, pack_weight, packed_linear
from lmserve.layers.linear import INT4_GROUP_SIZE, int8_linear, pack_int4_if_exact, pack_int8

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 49152, 9, 3, 64
LAYER_SHAPES = {  # name: (out_features, in_features)
    "qkv": (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HEADS * HEAD_DIM),
    "gate_up": (2 * INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
}
BLOCK_SIZE = 64


def timed(fn: Callable[[], object], calls: int = 30) -> float:
    """µs per call: the second best of 7 rounds after a warm-up."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[1]


def four_bit_weight(out_features: int, in_features: int) -> torch.Tensor:
    """A bf16 weight whose groups of 32 hold 16 evenly spaced values (GGUF Q4_1's form), so int4 packs it."""
    codes = torch.randint(0, 16, (out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE))
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans the whole 4-bit range
    # power-of-two scales keep every value exact in bf16 (what the int4 packing checks)
    scales = 2.0 ** -torch.randint(6, 10, (out_features, in_features // INT4_GROUP_SIZE, 1)).float()
    mins = -8 * scales
    return (codes * scales + mins).reshape(out_features, in_features).to(torch.bfloat16)


def gemm_rows(rows: list[int]) -> dict[str, dict[str, float]]:
    """Per layer and for the lm_head: µs of each kernel at each row count (absent where it does not apply)."""
    weights = {name: four_bit_weight(*shape) for name, shape in LAYER_SHAPES.items()}
    packed = {name: pack_weight(w) for name, w in weights.items()}
    int4 = {name: pack_int4_if_exact(w, torch.bfloat16) for name, w in weights.items()}
    head = torch.randn(VOCAB, HIDDEN).to(torch.bfloat16)
    head_packed, head_int8 = pack_weight(head), pack_int8(head, torch.bfloat16)
    results: dict[str, dict[str, float]] = {}
    for m in rows:
        xs = {name: torch.randn(m, w.shape[1]).to(torch.bfloat16) for name, w in weights.items()}
        x = torch.randn(m, HIDDEN).to(torch.bfloat16)
        row = {
            "layer_f_linear": sum(timed(partial(F.linear, xs[n], weights[n])) for n in weights),
            "layer_onednn": sum(timed(partial(packed_linear, xs[n], packed[n], None)) for n in weights),
            "lm_head_f_linear": timed(partial(F.linear, x, head), calls=5),
            "lm_head_onednn": timed(partial(packed_linear, x, head_packed, None), calls=5),
        }
        if m <= 16:
            int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            row["layer_int4"] = sum(
                timed(partial(int4_mm, xs[n], *int4[n][:1], INT4_GROUP_SIZE, *int4[n][1:]))
                for n in weights  # type: ignore[index]
            )
            row["lm_head_int8"] = timed(partial(int8_linear, x, head_int8), calls=5)
        results[str(m)] = row
        print(f"rows {m:4d}: " + "  ".join(f"{k} {v:8.1f}" for k, v in row.items()), flush=True)
    return results


def decode_plan(seq_lens: list[int], num_blocks: int) -> TorchPlan:
    """A decode-only step: one new token per sequence, blocks scattered over the cache."""
    per_seq = -(-max(seq_lens) // BLOCK_SIZE)
    tables = torch.randperm(num_blocks)[: len(seq_lens) * per_seq].view(len(seq_lens), per_seq).tolist()
    chunks = [SequenceChunk([0], n - 1, table) for n, table in zip(seq_lens, tables, strict=True)]
    return TorchAttentionBackend().prepare(build_step_batch(chunks, BLOCK_SIZE, "cpu").metadata)


def attention(batches: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for num_seqs, seq_len in batches:
        seq_lens = [seq_len - (i * 7) % 32 for i in range(num_seqs)]  # ragged, as a real batch
        num_blocks = num_seqs * -(-seq_len // BLOCK_SIZE) + 8
        plan = decode_plan(seq_lens, num_blocks)
        q = torch.randn(num_seqs, HEADS, HEAD_DIM).to(torch.bfloat16)
        kv = torch.randn(num_seqs, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
        row = {}
        for name, backend in (
            ("reference_layout", TorchAttentionBackend()),
            ("heads_first", CPUAttentionBackend()),
        ):
            cache = backend.allocate_kv_cache(
                1, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.bfloat16, q.device
            )[0]
            cache.normal_()
            row[name] = timed(partial(backend.forward, q, kv, kv, cache, plan, HEAD_DIM**-0.5))
        results[f"{num_seqs}x{seq_len}"] = row
        print(
            f"decode attention B={num_seqs:3d} L={seq_len:4d}: reference layout {row['reference_layout']:7.1f}  "
            f"heads first {row['heads_first']:7.1f} us",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 128, 256])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN linear ops")
    results: dict[str, object] = {"threads": args.threads, "load_before": os.getloadavg()[0]}
    results["gemm_us"] = gemm_rows(args.rows)
    results["attention_us"] = attention([(1, 200), (1, 512), (4, 256), (8, 256), (16, 200), (16, 320)])
    results["load_after"] = os.getloadavg()[0]
    print(f"load average {results['load_before']:.2f} -> {results['load_after']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
