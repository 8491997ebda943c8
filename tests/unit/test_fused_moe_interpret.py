"""The fused MoE kernel against its dense torch reference on tiny shapes (Triton's interpreter, on the CPU),
and the block alignment and the CPU expert loop checked directly."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.fused_moe import (
    KernelConfig,
    fused_moe_ref,
    max_num_blocks,
    moe_align_block_size,
    moe_align_block_size_ref,
)
from lmserve.kernels.testing import in_interpreter_child, relative_error, run_under_interpreter
from lmserve.layers.moe import TopKRouter, expert_loop

IN_CHILD = in_interpreter_child()
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child process")
parent_only = pytest.mark.skipif(IN_CHILD, reason="checked once, in the parent")


def random_moe(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, intermediate, generator=g) / intermediate**0.5).to(dtype)
    router = TopKRouter(hidden, num_experts, top_k, renormalize=True)
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, hidden, generator=g))
    weights, ids = router(x)
    return x, gate_up, down, weights, ids


@parent_only
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (50, 16, 4, 4)]
)
def test_align_groups_rows_by_expert_in_whole_blocks(
    num_tokens: int, num_experts: int, top_k: int, block_m: int
) -> None:
    _, _, _, _, ids = random_moe(num_tokens, num_experts, top_k, 16, 16, torch.float32, num_tokens)
    blocks = moe_align_block_size(ids, num_experts, block_m)
    num_rows = num_tokens * top_k
    used = int(blocks.num_rows_padded.item())
    assert used % block_m == 0 and blocks.expert_ids.numel() == max_num_blocks(num_rows, num_experts, block_m)
    assert blocks.expert_ids.numel() * block_m >= used
    sorted_rows = blocks.sorted_row_ids[:used].long()
    real = sorted_rows < num_rows
    assert sorted(sorted_rows[real].tolist()) == list(range(num_rows))  # every row exactly once
    assert bool((blocks.sorted_row_ids[used:] == num_rows).all())
    block_expert = blocks.expert_ids.long()[: used // block_m].repeat_interleave(block_m)
    assert torch.equal(block_expert[real], ids.flatten()[sorted_rows[real]])  # each row in its expert's block


@parent_only
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (9, 8, 2), (40, 16, 6)])
def test_cpu_expert_loop_matches_dense_reference(num_tokens: int, num_experts: int, top_k: int) -> None:
    x, gate_up, down, weights, ids = random_moe(num_tokens, num_experts, top_k, 32, 24, torch.float32, 3)
    out = expert_loop(x, gate_up, down, weights, ids)
    torch.testing.assert_close(out, fused_moe_ref(x, gate_up, down, weights, ids), atol=1e-5, rtol=1e-5)


@parent_only
def test_router_renormalizes_only_when_asked() -> None:
    x = torch.randn(5, 8)
    plain, renormalized = TopKRouter(8, 6, 2, False), TopKRouter(8, 6, 2, True)
    with torch.no_grad():
        plain.weight.normal_()
        renormalized.weight.copy_(plain.weight)
    (w_plain, ids_plain), (w_norm, ids_norm) = plain(x), renormalized(x)
    probs = (x @ plain.weight.T).softmax(-1)
    assert torch.equal(ids_plain, ids_norm) and torch.equal(ids_plain, probs.topk(2).indices)
    torch.testing.assert_close(w_plain, probs.topk(2).values)
    torch.testing.assert_close(w_norm, w_plain / w_plain.sum(-1, keepdim=True))


def test_fused_moe_matches_reference_under_interpreter() -> None:
    run_under_interpreter(__file__, timeout=300)


SMALL_TILES = KernelConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)


@child_only
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (5, 8, 2), (21, 8, 3)])
@pytest.mark.parametrize("config", [SMALL_TILES, None], ids=["small_tiles", "picked"])
def test_fused_moe_kernel(num_tokens: int, num_experts: int, top_k: int, config: KernelConfig | None) -> None:
    from lmserve.kernels.fused_moe import fused_moe

    # H and I not multiples of the tiles: masked edges in N and K
    x, gate_up, down, weights, ids = random_moe(num_tokens, num_experts, top_k, 40, 24, torch.float16, 7)
    out = fused_moe(x, gate_up, down, weights, ids, config)
    ref = fused_moe_ref(x, gate_up, down, weights, ids)
    assert out.shape == ref.shape and out.dtype == torch.float16
    assert relative_error(out, ref) < 5e-3


@child_only
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (45, 8, 2, 16), (70, 128, 8, 16), (9, 6, 2, 4)]
)
def test_align_kernel_equals_torch(num_tokens: int, num_experts: int, top_k: int, block_m: int) -> None:
    from lmserve.kernels.fused_moe import moe_align_block_size_triton

    _, _, _, _, ids = random_moe(num_tokens, num_experts, top_k, 16, 16, torch.float32, num_tokens)
    ours, ref = (
        moe_align_block_size_triton(ids, num_experts, block_m),
        moe_align_block_size_ref(ids, num_experts, block_m),
    )
    assert torch.equal(ours.num_rows_padded, ref.num_rows_padded)
    assert torch.equal(ours.sorted_row_ids, ref.sorted_row_ids)
    assert torch.equal(ours.expert_ids, ref.expert_ids)
