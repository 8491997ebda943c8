"""The CPU decode fast paths: lossless 4-bit copies of exactly-4-bit weights, and the int8 lm_head copy."""

from __future__ import annotations

import torch

from lmserve.layers.linear import INT4_GROUP_SIZE, Linear, int8_linear, pack_int4_if_exact, pack_int8


def exactly_4bit_weight(num_out: int, num_in: int, seed: int = 0) -> torch.Tensor:
    """Q4_1-style groups: min + scale * code, codes 0..15 with both ends used in every group."""
    generator = torch.Generator().manual_seed(seed)
    groups = num_in // INT4_GROUP_SIZE
    codes = torch.randint(0, 16, (num_out, groups, INT4_GROUP_SIZE), generator=generator)
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(num_out, groups, 1, generator=generator) * 0.01 + 0.001
    low = torch.randn(num_out, groups, 1, generator=generator) * 0.05
    return (low + scale * codes).reshape(num_out, num_in)


def linear_with(weight: torch.Tensor) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
    layer.weight.data.copy_(weight)
    return layer


def test_exact_4bit_weight_is_packed_and_matches_dense_bf16() -> None:
    weight = exactly_4bit_weight(64, 128)
    layer = linear_with(weight)
    assert layer.keep_int4_if_exact(weight)
    x = torch.randn(3, 128).to(torch.bfloat16)
    dense = torch.nn.functional.linear(x.float(), weight)  # float32 truth
    packed = layer(x).float()
    assert (packed - dense).abs().max() <= 0.02 * dense.abs().max()
    # many rows take the dense path, which must agree too
    many = torch.randn(8, 128).to(torch.bfloat16)
    assert torch.equal(layer(many), torch.nn.functional.linear(many, layer.weight))


def test_weights_that_are_not_4bit_stay_dense() -> None:
    weight = torch.randn(64, 128)
    assert pack_int4_if_exact(weight, torch.bfloat16) is None
    assert not linear_with(weight).keep_int4_if_exact(weight)


def test_float32_models_never_get_a_4bit_copy() -> None:
    weight = exactly_4bit_weight(32, 64)
    layer = Linear(64, 32, bias=False)
    layer.weight.data.copy_(weight)
    assert not layer.keep_int4_if_exact(weight)


def test_int8_lm_head_is_close_to_dense() -> None:
    weight = torch.randn(500, 64)
    x = torch.randn(2, 64).to(torch.bfloat16)
    out = int8_linear(x, pack_int8(weight.to(torch.bfloat16), torch.bfloat16)).float()
    dense = x.float() @ weight.t()
    assert (out - dense).abs().max() <= 0.03 * dense.abs().max()


def test_int8_lm_head_packing_keeps_its_floor_for_tiny_rows() -> None:
    # pack_int8's own formula before it shared the row quantizer: absmax floored at 1e-12, not scale at 1e-8
    weight = torch.randn(6, 64) * torch.tensor([1.0, 1e-3, 1e-7, 3e-9, 1e-13, 0.0])[:, None]
    scales = weight.abs().amax(1).clamp_min(1e-12) / 127
    codes = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    packed_codes, packed_scales = pack_int8(weight, torch.float32)
    assert torch.equal(packed_codes, codes) and torch.equal(packed_scales, scales)
    assert packed_codes[2].abs().max() == 127  # a 1e-7 row still spans all levels
