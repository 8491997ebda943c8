"""The tinygemm side of W4A16 that runs without a GPU: zero conversion, shape rules, the model's dtype.

tinygemm itself (torch.ops.aten._weight_int4pack_mm) is CUDA-only here: tests/gpu/test_quant_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmserve.kernels.awq_dequant import awq_dequantize_ref
from lmserve.kernels.w4a16 import tinygemm_supported, tinygemm_zeros
from lmserve.layers.quant import AWQLinear, activation_dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tinygemm_zeros_reproduce_the_awq_weight(dtype: torch.dtype) -> None:
    """(q - 8) * s + (8 - z) * s == (q - z) * s, up to the one rounding of the float zero to dtype."""
    k, n, group = 256, 64, 128
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32)
    scales = (torch.rand(k // group, n) * 0.01 + 0.002).to(dtype)
    ones = torch.ones_like(scales)
    q = awq_dequantize_ref(qweight, torch.zeros_like(qzeros), ones, group, torch.float32)
    z = -awq_dequantize_ref(torch.zeros_like(qweight), qzeros, ones, group, torch.float32)[::group]  # 0..15
    exact = (8 - z) * scales.float()  # <= 15 significant bits: exact in float32
    zero = tinygemm_zeros(qzeros, scales, dtype).float()
    assert torch.all((zero - exact).abs() <= exact.abs() * torch.finfo(dtype).eps / 2)
    tiny = (q - 8) * scales.float().repeat_interleave(group, 0) + zero.repeat_interleave(group, 0)
    awq = awq_dequantize_ref(qweight, qzeros, scales, group, torch.float32)
    assert torch.allclose(tiny, awq, rtol=0, atol=float((zero - exact).abs().max()) * 1.001 + 1e-7)
    power_of_two = torch.full_like(scales, 2.0**-7)  # (8 - z) * 2**-7 is exact in any 16-bit float
    assert torch.equal(tinygemm_zeros(qzeros, power_of_two, dtype).float(), (8 - z) * 2.0**-7)


def test_tinygemm_shape_rules() -> None:
    assert tinygemm_supported(4096, 6144, 128)
    assert not tinygemm_supported(4096, 6144, 96)  # group size tinygemm does not take
    assert not tinygemm_supported(4160, 6144, 64)  # K not a multiple of 8 inner tiles of 16
    assert not tinygemm_supported(4096, 6148, 128)  # N not a multiple of 8


def test_activation_dtype_skips_the_quantized_layers() -> None:
    """AWQLinear's fp16 scales must not decide the dtype tinygemm's copy is packed for."""
    model = nn.Sequential(
        nn.Embedding(8, 128, dtype=torch.bfloat16), AWQLinear(128, 64, bias=False, group_size=128)
    )
    assert activation_dtype(model) == torch.bfloat16
    assert activation_dtype(nn.Sequential(AWQLinear(128, 64, bias=False, group_size=128))) is None
