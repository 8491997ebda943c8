"""Batched LoRA updates y += B_s (A_s x) with a per-token adapter slot s (0 = base, no update).

Weights are stacked per linear over the loaded adapters: `a` [N, R, K] (adapter s at index s - 1) and
`bt` [N, R, M] (B transposed, scaling folded in). Three ways to apply them, all equal:
- `lora_ref`: gather each token's A and B and bmm (punica's BGMV in torch): the reference.
- `lora_dense_masked`: the CPU path. One GEMM against every adapter's A at once, a 0/1 mask that keeps
  each token's own slot, one GEMM against every adapter's B. Every adapter's weights are read once per
  step rather than once per token, and the step is branch-free; the cost grows with N (fine for the
  handful of adapters a CPU serves: at N = 4 and rank 8 it adds ~15% of SmolLM2's linear FLOPs).
  `lora_expand_masked` is its second half, for callers whose shrink came out of the base GEMM (lora/layers.py).
- `lora_shrink` + `lora_expand`: the CUDA path, two Triton kernels (BGMV: one program per token and tile).
"""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, next_power_of_2, tl


def lora_ref(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor
) -> None:
    """y [T, M] += per token t with slots[t] > 0: (x[t] @ a[s-1].T) @ bt[s-1], in float32."""
    index = (slots.long() - 1).clamp_min(0)
    shrunk = torch.bmm(a[index].float(), x.float().unsqueeze(-1)).squeeze(-1)
    delta = torch.bmm(shrunk.unsqueeze(1), bt[index].float()).squeeze(1)
    y += torch.where((slots > 0).unsqueeze(-1), delta, 0.0).to(y.dtype)


def slot_mask(slots: torch.Tensor, num_adapters: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, N * rank] 0/1: ones over the rank columns of each token's adapter (none for base tokens)."""
    one_hot = torch.nn.functional.one_hot(slots.long(), num_adapters + 1)[:, 1:].to(dtype)
    return one_hot.repeat_interleave(rank, dim=1)


def lora_dense_masked(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, mask: torch.Tensor
) -> None:
    """y += ((x @ A_all.T) * mask) @ Bt_all, A_all = a viewed [N*R, K], Bt_all = bt viewed [N*R, M]."""
    num_adapters, rank, in_features = a.shape
    lora_expand_masked(y, torch.nn.functional.linear(x, a.view(num_adapters * rank, in_features)), bt, mask)


def lora_expand_masked(y: torch.Tensor, shrunk: torch.Tensor, bt: torch.Tensor, mask: torch.Tensor) -> None:
    """y += (shrunk * mask) @ Bt_all: the expand half of lora_dense_masked (shrunk [T, N*R] may be a view)."""
    # not y.addmm_: torch's in-place bf16 addmm on the CPU can miss oneDNN (10 ms instead of 30 us per call)
    y.add_(torch.mm(shrunk * mask, bt.view(-1, bt.shape[-1])))


@jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, slots_ptr, out_ptr, K, R, stride_x, stride_a, stride_ar, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    read_k = tl.where(slot > 0, K, 0)  # base tokens read nothing and write zeros
    adapter = tl.maximum(slot - 1, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token * stride_x + cols, mask=cols < read_k, other=0.0).to(tl.float32)
        a_tile = a_ptr + adapter * stride_a + ranks[:, None] * stride_ar + cols[None, :]
        a_mask = (ranks[:, None] < R) & (cols[None, :] < read_k)
        acc += tl.sum(tl.load(a_tile, mask=a_mask, other=0.0).to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + token * stride_out + ranks, acc, mask=ranks < R)


@jit
def _lora_expand_kernel(
    shrunk_ptr, bt_ptr, slots_ptr, y_ptr, M, R, stride_shrunk, stride_b, stride_br, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    write_m = tl.where(slot > 0, M, 0)  # base tokens read nothing and leave y untouched
    adapter = tl.maximum(slot - 1, 0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(shrunk_ptr + token * stride_shrunk + ranks, mask=ranks < R, other=0.0)
        b_tile = bt_ptr + adapter * stride_b + ranks[:, None] * stride_br + cols[None, :]
        b_mask = (ranks[:, None] < R) & (cols[None, :] < write_m)
        acc += tl.sum(tl.load(b_tile, mask=b_mask, other=0.0).to(tl.float32) * h[:, None], axis=0)
    y_cols = y_ptr + token * stride_y + cols
    out_mask = cols < write_m
    y = tl.load(y_cols, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_cols, (y + acc).to(y_ptr.dtype.element_ty), mask=out_mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, block_k: int = 128) -> torch.Tensor:
    """[T, R] float32: x[t] @ a[slots[t] - 1].T (zeros for base tokens)."""
    num_tokens, in_features = x.shape
    rank = a.shape[1]
    assert x.stride(-1) == 1 and a.is_contiguous()
    out = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)
    block_r = min(next_power_of_2(rank), 64)
    grid = (num_tokens, math.ceil(rank / block_r))
    _lora_shrink_kernel[grid](
        x, a, slots, out, in_features, rank, x.stride(0), a.stride(0), a.stride(1), out.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def lora_expand(
    y: torch.Tensor, shrunk: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor, block_m: int = 128
) -> None:
    """y[t] += shrunk[t] @ bt[slots[t] - 1] in place (rows of base tokens untouched)."""
    num_tokens, out_features = y.shape
    rank = bt.shape[1]
    assert y.stride(-1) == 1 and bt.is_contiguous() and shrunk.is_contiguous()
    block_r = min(next_power_of_2(rank), 32)
    grid = (num_tokens, math.ceil(out_features / block_m))
    _lora_expand_kernel[grid](
        shrunk, bt, slots, y, out_features, rank, shrunk.stride(0), bt.stride(0), bt.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r,
    )  # fmt: skip


def lora_triton(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor
) -> None:
    """y += B_s (A_s x) per token through the two kernels."""
    if y.shape[0]:
        lora_expand(y, lora_shrink(x, a, slots), bt, slots)
