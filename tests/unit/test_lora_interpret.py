"""The LoRA Triton kernels and the CPU masked path against the gather + bmm reference (interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.lora import lora_dense_masked, lora_ref, slot_mask
from lmserve.kernels.testing import in_interpreter_child, run_under_interpreter

IN_CHILD = in_interpreter_child()
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child process")


def stacks(num_adapters: int, rank: int, in_features: int, out_features: int, dtype: torch.dtype) -> tuple:
    torch.manual_seed(rank)
    a = torch.randn(num_adapters, rank, in_features).to(dtype)
    bt = torch.randn(num_adapters, rank, out_features).to(dtype) * 0.1
    return a, bt


def test_dense_masked_equals_gather_bmm_reference() -> None:
    a, bt = stacks(3, 12, 40, 24, torch.float32)
    x, y = torch.randn(7, 40), torch.randn(7, 24)
    slots = torch.tensor([0, 1, 2, 3, 3, 0, 2], dtype=torch.int32)
    ours, ref = y.clone(), y.clone()
    lora_dense_masked(ours, x, a, bt, slot_mask(slots, 3, 12, torch.float32))
    lora_ref(ref, x, a, bt, slots)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[0], y[0]) and not torch.allclose(ours[1], y[1])  # base rows untouched


def test_lora_kernels_match_reference_under_interpreter() -> None:
    run_under_interpreter(__file__, timeout=300)


if IN_CHILD:
    from lmserve.kernels.lora import lora_expand, lora_shrink, lora_triton


@child_only
@pytest.mark.parametrize("rank, in_features, out_features", [(8, 64, 48), (24, 100, 130), (64, 32, 16)])
def test_shrink_expand_match_reference(rank: int, in_features: int, out_features: int) -> None:
    dtype = torch.float16  # numpy, under the interpreter, has no bfloat16
    a, bt = stacks(4, rank, in_features, out_features, dtype)
    x = torch.randn(6, in_features).to(dtype)
    y = torch.randn(6, out_features).to(dtype)
    slots = torch.tensor([2, 0, 4, 1, 0, 3], dtype=torch.int32)
    shrunk = lora_shrink(x, a, slots, block_k=32)
    expected = torch.einsum("tk,trk->tr", x.float(), a[(slots.long() - 1).clamp_min(0)].float())
    expected[slots == 0] = 0
    torch.testing.assert_close(shrunk, expected, atol=1e-2, rtol=1e-3)
    ours, ref = y.clone(), y.clone()
    lora_expand(ours, shrunk, bt, slots, block_m=32)
    lora_ref(ref, x, a, bt, slots)
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-3)
    assert torch.equal(ours[slots == 0], y[slots == 0])
    both = y.clone()
    lora_triton(both, x, a, bt, slots)
    assert torch.equal(both, ours)
