"""The batch-1 greedy step on CUDA: greedy_argmax against torch.argmax (ties included), the Triton GEMV over
16-bit weights (float32 logits) against the float32 reference."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.argmax import greedy_argmax
from lmserve.kernels.fp8 import fp8_gemv
from lmserve.kernels.testing import relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 3, 64])
@pytest.mark.parametrize("vocab_size", [97, 4096, 4097, 49152, 128256])
def test_greedy_argmax_matches_torch_with_ties(num_rows: int, vocab_size: int, dtype: torch.dtype) -> None:
    logits = torch.randn(num_rows, vocab_size, device="cuda").to(dtype)
    # each row's maximum again at a later index, in another chunk where the row has one: the first must win
    top, first = logits.max(-1)
    later = torch.randint(0, vocab_size, (num_rows,), device="cuda").maximum(first)
    logits[torch.arange(num_rows), later] = top
    logits[0, :] = logits[0, 0]  # a constant row: index 0
    expected = logits.argmax(-1)
    assert expected[0] == 0
    assert torch.equal(greedy_argmax(logits), expected)
    # twice: the per-row arrival counters reset themselves
    assert torch.equal(greedy_argmax(logits), expected)


def test_greedy_argmax_of_masked_rows_and_in_a_cuda_graph() -> None:
    logits = torch.randn(4, 49152, device="cuda")
    logits[1, :40000] = float("-inf")  # a grammar mask leaves a few tokens
    logits[2, :] = float("-inf")
    logits[2, 7] = -1e30
    expected = logits.argmax(-1)
    greedy_argmax(logits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = greedy_argmax(logits)
    for _ in range(3):
        graph.replay()
        assert torch.equal(out, expected)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("k,n", [(4096, 49152), (4096, 6144), (14336, 4096), (576, 49152), (64, 97)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_of_16bit_weights_writes_float32(k: int, n: int, dtype: torch.dtype, bias: bool) -> None:
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    weight = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    out = fp8_gemv(x, weight, None, b, out_dtype=torch.float32)
    ref = x.float() @ weight.float().t() + (0 if b is None else b.float())
    assert out.dtype == torch.float32 and out.shape == (1, n)
    # float32 sums of exact products, in another order than torch's: no output rounding to 16 bits
    assert relative_error(out, ref) < 1e-5
