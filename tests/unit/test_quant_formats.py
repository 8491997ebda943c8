"""AutoAWQ GEMM packing (round trip and a hand-written fixture), RTN, and the quantized linears."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels.awq_dequant import pack_awq, unpack_awq
from lmserve.kernels.int8_gemm import quantize_rows_int8
from lmserve.layers.quant import AWQLinear, W8A8Linear, int8_matmul, make_quantized_linear
from lmserve.layers.quant_formats import awq_dequantize, quant_method
from lmserve.quant.rtn import awq_tensors, dequantize_groups, quantize_groups


def test_pack_round_trip() -> None:
    values = torch.randint(0, 16, (37, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (37, 8)
    assert torch.equal(unpack_awq(packed), values)


def test_fixture_in_autoawq_order() -> None:
    # Written by hand: nibble i (bits 4i..4i+3) of the int32 holds column [0, 2, 4, 6, 1, 3, 5, 7][i].
    # Columns 0..7 hold the values 1..8, so the nibbles, lowest first, read 1, 3, 5, 7, 2, 4, 6, 8.
    packed = torch.tensor([[0x86427531]], dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    expected = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.int32)
    assert torch.equal(unpack_awq(packed), expected)
    assert torch.equal(pack_awq(expected), packed)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match="0..15"):
        pack_awq(torch.full((2, 8), 16, dtype=torch.int32))


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_bounded_by_half_a_step(symmetric: bool) -> None:
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    quantized = quantize_groups(weight, 4, 64, symmetric)
    assert quantized.q.min() >= 0 and quantized.q.max() <= 15
    error = (dequantize_groups(quantized) - weight).abs()
    step = quantized.scales.repeat_interleave(64, dim=1)
    assert (error <= step * 0.5 + 1e-6).all()
    if symmetric:
        assert (quantized.zeros == 8).all()


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="w_group_size=128 does not divide .*576.*64"):
        quantize_groups(torch.randn(8, 576), 4, 128, False)


def test_awq_linear_matches_dequantized_weight() -> None:
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    quantized = quantize_groups(weight, 4, 32, False)
    layer = AWQLinear(128, 24, bias=False, group_size=32)
    for name, tensor in awq_tensors(quantized).items():
        getattr(layer, name).data = tensor
    reference_weight = dequantize_groups(quantized)  # float32 scales; the layer holds fp16 ones
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), F.linear(x, reference_weight), atol=2e-2, rtol=1e-2)
    exact = awq_dequantize(layer.qweight, layer.qzeros, layer.scales.float(), 32)
    torch.testing.assert_close(layer(x), x @ exact)


def test_w8a8_linear_is_close_to_float() -> None:
    generator = torch.Generator().manual_seed(3)
    weight, x = torch.randn(64, 96, generator=generator), torch.randn(40, 96, generator=generator)
    layer = W8A8Linear(96, 64, bias=False)
    q, scale = quantize_rows_int8(weight)
    layer.weight.data, layer.weight_scale.data = q, scale
    out, reference = layer(x), F.linear(x, weight)
    assert ((out - reference).norm() / reference.norm()) < 0.02


def test_int8_rows_by_hand() -> None:
    # absmax 127 gives scale 1 exactly, so the codes are the values rounded half to even
    x = torch.tensor([[[127.0, -63.5, 0.5, 1.5, 2.5], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    codes, scale = quantize_rows_int8(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (1, 2, 1)
    assert codes.tolist() == [[[127, -64, 0, 2, 2], [0, 0, 0, 0, 0]]]
    assert scale.flatten().tolist() == [1.0, torch.tensor(1e-8).item()]  # an all-zero row gets the floor


def test_int8_matmul_is_exact() -> None:
    generator = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (32, 64), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 16), generator=generator, dtype=torch.int8)
    expected = (a.long() @ b.long()).float()
    assert torch.equal(int8_matmul(a, b), expected)
    assert torch.equal(int8_matmul(a[:3], b), expected[:3])  # small batch: the float fallback


def test_make_quantized_linear_dispatch_and_errors() -> None:
    awq = make_quantized_linear(
        128, 64, False, {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}
    )
    assert isinstance(awq, AWQLinear) and awq.output_dims["qweight"] == 1
    with pytest.raises(ValueError, match="only bits=4"):
        quant_method({"quant_method": "awq", "bits": 3, "group_size": 64})
    with pytest.raises(ValueError, match="unsupported quantization_config"):
        quant_method({"quant_method": "gptq"})
