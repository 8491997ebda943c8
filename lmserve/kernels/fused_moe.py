"""Fused mixture-of-experts: a Triton grouped GEMM over tokens sorted by expert (vLLM's / SGLang's fused_moe).

Each (token, choice) pair of the router's top-k is one row. `moe_align_block_size` sorts the rows by expert and
pads each expert's run to a multiple of BLOCK_M, so every BLOCK_M-row block belongs to one expert; the kernel
then multiplies each block by its expert's weight tile. Two launches:
1. gate_up: rows of x [T, H] times the expert's [2I, H] weight, silu(gate) * up fused in, -> [T * k, I];
2. down: those rows times the expert's [H, I] weight, scaled by the row's routing weight, -> [T * k, H];
and a sum over the k choices. Everything is sized from host shapes only (no device-to-host copy), so the
whole path replays under CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmserve.kernels._triton import jit, next_power_of_2, tl


@dataclass(frozen=True)
class MoEBlocks:
    """Rows sorted by expert, padded per expert to whole blocks (see moe_align_block_size)."""

    sorted_row_ids: torch.Tensor
    """int32 [num_blocks * block_m]: row ids (token * k + choice) grouped by expert; padding holds num_rows."""
    expert_ids: torch.Tensor
    """int32 [num_blocks]: the expert of each block."""
    num_rows_padded: torch.Tensor
    """int32 [1]: rows in use after padding; blocks from there on are skipped."""
    block_m: int


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def pick_config(num_rows: int, num_experts: int) -> KernelConfig:
    """Tile sizes by rows per expert: thin tiles that stream weights for decode, tensor-core tiles for prefill."""
    rows_per_expert = num_rows / num_experts
    if rows_per_expert <= 2:
        return KernelConfig(16, 32, 128, 1, 4, 4)
    if rows_per_expert <= 32:
        return KernelConfig(32, 64, 64, 4, 4, 3)
    return KernelConfig(64, 128, 64, 8, 8, 3)


def max_num_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the padded blocks: sum over hit experts of ceil(count / block_m), at most
    floor(num_rows / block_m) plus one partial block per expert hit (at most min(num_rows, E) experts)."""
    return num_rows // block_m + min(num_rows, num_experts)


@jit
def _moe_align_kernel(
    ids_ptr,
    sorted_row_ids_ptr,
    expert_ids_ptr,
    num_rows_padded_ptr,
    num_rows,
    num_experts,
    num_blocks,
    BLOCK_M: tl.constexpr,
    EXPERTS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program: count rows per expert, pad, place each row (stable within its expert), label the blocks.

    Replaces some thirty small torch launches per MoE layer, which at batch-1 decode cost more than the
    experts' weights take to stream on a small-expert model (Qwen3-30B-A3B).
    """
    experts = tl.arange(0, EXPERTS)
    counts = tl.zeros([EXPERTS], dtype=tl.int32)
    for start in range(0, num_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(num_rows_padded_ptr, tl.sum(padded, axis=0))
    for start in range(0, num_blocks * BLOCK_M, CHUNK):
        slots = start + tl.arange(0, CHUNK)
        tl.store(sorted_row_ids_ptr + slots, num_rows, mask=slots < num_blocks * BLOCK_M)
    tl.debug_barrier()  # the padding is written before rows land among it
    next_slot = ends - padded
    for start in range(0, num_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
        slot = tl.sum(one_hot * (tl.cumsum(one_hot, axis=0) - one_hot + next_slot[None, :]), axis=1)
        tl.store(sorted_row_ids_ptr + slot, rows, mask=rows < num_rows)
        next_slot += tl.sum(one_hot, axis=0)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        # the expert whose padded range holds the block's first row: how many ranges end at or before it
        expert = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.minimum(expert, num_experts - 1), mask=blocks < num_blocks)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEBlocks:
    """Sort the rows of topk_ids [T, k] by expert and pad each expert's rows to a multiple of block_m.

    On CUDA one Triton program; elsewhere (and as its reference) torch ops.
    """
    if topk_ids.is_cuda:
        return moe_align_block_size_triton(topk_ids, num_experts, block_m)
    return moe_align_block_size_ref(topk_ids, num_experts, block_m)


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEBlocks:
    ids = topk_ids.flatten()  # int32 or int64: the kernel reads either (no cast launch)
    num_blocks = max_num_blocks(ids.numel(), num_experts, block_m)
    sorted_row_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=ids.device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    num_rows_padded = torch.empty(1, dtype=torch.int32, device=ids.device)
    experts = next_power_of_2(num_experts)
    _moe_align_kernel[(1,)](
        ids,
        sorted_row_ids,
        expert_ids,
        num_rows_padded,
        ids.numel(),
        num_experts,
        num_blocks,
        BLOCK_M=block_m,
        EXPERTS=experts,
        CHUNK=max(16, min(128, 8192 // experts)),
        num_warps=4,
    )
    return MoEBlocks(sorted_row_ids, expert_ids, num_rows_padded, block_m)


def moe_align_block_size_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEBlocks:
    """moe_align_block_size in torch ops (no host sync either)."""
    expert_of_row = topk_ids.flatten().to(torch.int64)
    num_rows = expert_of_row.numel()
    device = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert_of_row, torch.ones_like(expert_of_row))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded_counts.cumsum(0)
    order = torch.argsort(expert_of_row, stable=True)
    sorted_experts = expert_of_row[order]
    rank_in_expert = torch.arange(num_rows, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    destination = (padded_ends - padded_counts)[sorted_experts] + rank_in_expert
    num_blocks = max_num_blocks(num_rows, num_experts, block_m)
    sorted_row_ids = torch.full((num_blocks * block_m,), num_rows, dtype=torch.int32, device=device)
    sorted_row_ids.scatter_(0, destination, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return MoEBlocks(sorted_row_ids, expert_ids.to(torch.int32), padded_ends[-1:].to(torch.int32), block_m)


@jit
def _fused_moe_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    routing_weights_ptr,
    sorted_row_ids_ptr,
    expert_ids_ptr,
    num_rows_padded_ptr,
    num_out,
    num_in,
    num_rows,
    num_blocks,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    ROWS_PER_A_ROW: tl.constexpr,
    FUSE_SILU_MUL: tl.constexpr,
    MUL_ROUTING_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """C[row, n] = A[row // ROWS_PER_A_ROW] . B[expert(row)][n] over the sorted, padded rows.

    With FUSE_SILU_MUL, B holds [gate; up] (2 * num_out rows) and C = silu(A . gate) * (A . up).
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(num_out, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    if pid_m * BLOCK_M >= tl.load(num_rows_padded_ptr):
        return
    offs_row = tl.load(sorted_row_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = offs_row < num_rows
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < num_out
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_row // ROWS_PER_A_ROW)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, num_in, BLOCK_K):
        k_mask = offs_k < num_in - k_start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if FUSE_SILU_MUL:
            b_up = tl.load(b_ptrs + num_out * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if FUSE_SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_ROUTING_WEIGHT:
        weight = tl.load(routing_weights_ptr + offs_row, mask=row_mask, other=0.0)
        acc = acc * weight[:, None]
    c_ptrs = c_ptr + offs_row[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _grouped_gemm(
    a: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    routing_weights: torch.Tensor,
    blocks: MoEBlocks,
    config: KernelConfig,
    rows_per_a_row: int,
    fuse_silu_mul: bool,
) -> None:
    num_out = out.shape[1]
    num_blocks = blocks.expert_ids.numel()
    grid = (num_blocks * -(-num_out // config.block_n),)
    assert a.stride(1) == 1 and weights.stride(2) == 1 and out.stride(1) == 1
    _fused_moe_kernel[grid](
        a,
        weights,
        out,
        routing_weights,
        blocks.sorted_row_ids,
        blocks.expert_ids,
        blocks.num_rows_padded,
        num_out,
        weights.shape[2],
        routing_weights.numel(),
        num_blocks,
        a.stride(0),
        weights.stride(0),
        weights.stride(1),
        out.stride(0),
        ROWS_PER_A_ROW=rows_per_a_row,
        FUSE_SILU_MUL=fuse_silu_mul,
        MUL_ROUTING_WEIGHT=not fuse_silu_mul,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # float32 models get float32 products
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def fused_moe(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], topk_weights/ids [T, k] -> [T, H] in x.dtype."""
    num_tokens, top_k = topk_ids.shape
    num_experts, intermediate = gate_up_proj.shape[0], down_proj.shape[2]
    num_rows = num_tokens * top_k
    config = config or pick_config(num_rows, num_experts)
    blocks = moe_align_block_size(topk_ids, num_experts, config.block_m)
    routing_weights = topk_weights.flatten().float()
    hidden = torch.empty(num_rows, intermediate, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, gate_up_proj, hidden, routing_weights, blocks, config, top_k, fuse_silu_mul=True)
    rows_out = torch.empty(num_rows, down_proj.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(hidden, down_proj, rows_out, routing_weights, blocks, config, 1, fuse_silu_mul=False)
    return rows_out.view(num_tokens, top_k, -1).sum(dim=1)


def fused_moe_ref(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Dense float32 reference: every expert on every token, weighted by its routing weight (0 when not chosen)."""
    num_experts = gate_up_proj.shape[0]
    dense_weights = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    dense_weights.scatter_add_(1, topk_ids.long(), topk_weights.float())
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(num_experts):
        gate, up = F.linear(x.float(), gate_up_proj[expert].float()).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, down_proj[expert].float())
        out += dense_weights[:, expert, None] * expert_out
    return out.to(x.dtype)
