"""Random paged batches for checking attention kernels and backends against their references."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmserve.attention.metadata import AttentionMetadata, SequenceChunk, build_step_batch

if TYPE_CHECKING:
    from lmserve.attention.backend import AttentionBackend

# Largest ||out - ref|| / ||ref|| accepted for attention, by operand dtype (reference in float32 from the same
# inputs): one rounding of the output is ~2^-9 (bf16) or ~2^-12 (fp16), and the kernels also round P to it.
TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-3}


@dataclass
class PagedBatch:
    """New q/k/v for a ragged batch, a KV cache whose context slots hold random earlier tokens, and its metadata."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layer_cache: torch.Tensor
    meta: AttentionMetadata


def make_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    num_padding_tokens: int = 0,
    seed: int = 0,
) -> PagedBatch:
    """Sequences whose first query_lens are 1 are decodes; blocks are shuffled so tables are not contiguous.

    num_padding_tokens extra rows at the end of q/k/v have slot -1 and belong to no sequence.
    """
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    physical = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(blocks_per_seq) + 1  # one spare column, as a batch whose longest table is not full
    chunks = []
    for query_len, seq_len, count in zip(query_lens, seq_lens, blocks_per_seq, strict=True):
        table = [physical.pop() for _ in range(count)] + [0] * (width - count)
        chunks.append(SequenceChunk([0] * query_len, seq_len - query_len, table))
    meta = build_step_batch(chunks, block_size, device).metadata
    padding = torch.full((num_padding_tokens,), -1, dtype=torch.int64, device=meta.slot_mapping.device)
    meta = dataclasses.replace(meta, slot_mapping=torch.cat([meta.slot_mapping, padding]))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    num_tokens = meta.num_tokens + num_padding_tokens
    layer_cache = randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    q, k, v = (
        randn(num_tokens, num_q_heads, head_dim),
        randn(num_tokens, num_kv_heads, head_dim),
        randn(num_tokens, num_kv_heads, head_dim),
    )
    return PagedBatch(q.to(device), k.to(device), v.to(device), layer_cache.to(device), meta)


def backend_step(
    backend: AttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_cache: Any,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One layer of one step through a backend, as the model runs it: plan the step, then forward."""
    return backend.forward(q, k, v, layer_cache, backend.prepare(meta), scale, sliding_window)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def reference_forward(
    batch: PagedBatch, scale: float, sliding_window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel references composed as a backend would: store K/V, then decode and prefill attention.

    Returns (out [T, Hq, D] with padding rows zero, the cache after the write); batch is left unchanged.
    """
    from lmserve.kernels.decode_attention import paged_decode_attention_ref
    from lmserve.kernels.kv_write import store_kv_ref
    from lmserve.kernels.prefill_attention import paged_prefill_attention_ref

    meta, cache = batch.meta, batch.layer_cache.clone()
    store_kv_ref(batch.k, batch.v, cache[0], cache[1], meta.slot_mapping)
    out = paged_prefill_attention_ref(
        batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
        first_seq=meta.num_decodes, num_seqs=meta.num_seqs - meta.num_decodes, sliding_window=sliding_window,
    )  # fmt: skip
    if meta.num_decodes:
        out[: meta.num_decodes] = paged_decode_attention_ref(
            batch.q[: meta.num_decodes], cache[0], cache[1], meta.block_tables, meta.seq_lens, scale,
            sliding_window,
        )  # fmt: skip
    return out, cache


INTERPRET_CHILD_ENV = "LMSERVE_INTERPRET_CHILD"


def in_interpreter_child() -> bool:
    """True inside the child pytest that run_under_interpreter starts."""
    import os

    return os.environ.get(INTERPRET_CHILD_ENV) == "1"


def run_under_interpreter(test_file: str, timeout: int = 600) -> None:
    """Run a test file's kernel tests in a child pytest with TRITON_INTERPRET=1 (CPU).

    TRITON_INTERPRET must be set before triton is imported, which in the parent pytest may already
    have happened; the child imports everything afresh. Fails with the child's output.
    """
    import os
    import subprocess
    import sys

    import pytest

    if in_interpreter_child():
        pytest.skip("this is the child")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", INTERPRET_CHILD_ENV: "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
