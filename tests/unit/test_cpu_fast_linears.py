"""The CPU fast paths: lossless 4-bit copies of exactly-4-bit weights, the int8 lm_head copy, oneDNN's packed GEMM."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import cpu_native
from lmserve.layers import linear as linear_module
from lmserve.layers.cpu_gemm import ONEDNN_ENV, onednn_available, pack_cpu_linears, pack_weight, packed_linear
from lmserve.layers.linear import (
    INT4_GROUP_SIZE,
    INT4_MAX_ROWS,
    Linear,
    int8_linear,
    pack_int4_if_exact,
    pack_int8,
)


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
    strided = torch.cat([x, x], dim=-1)[:, :128]  # strided rows: the kernel itself refuses them
    assert torch.equal(layer(strided), layer(x))
    # 5-16 rows take the C GEMM's 4-bit copy where it runs (close to the truth), more rows the dense path
    several = torch.randn(8, 128).to(torch.bfloat16)
    truth = torch.nn.functional.linear(several.float(), weight)
    assert (layer(several).float() - truth).abs().max() <= 0.02 * truth.abs().max()
    many = torch.randn(17, 128).to(torch.bfloat16)
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


@pytest.mark.skipif(not onednn_available(), reason="this torch lacks oneDNN's packed linear")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 96), (1, 96), (16, 96), (2, 5, 96)])
def test_onednn_packed_linear_matches_float64_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(80, 96, generator=generator).to(dtype)
    bias = torch.randn(80, generator=generator).to(dtype)
    x = torch.randn(*shape, generator=generator).to(dtype)
    out = packed_linear(x, pack_weight(weight), bias)
    truth = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert out.shape == truth.shape and out.dtype == dtype
    if truth.numel():
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert (out.double() - truth).abs().max() <= tolerance * truth.abs().max()


@pytest.mark.skipif(not onednn_available(), reason="this torch lacks oneDNN's packed linear")
def test_pack_cpu_linears_routes_many_rows_to_onednn_and_few_to_int4(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = exactly_4bit_weight(64, 128)
    model = torch.nn.Sequential(linear_with(weight))
    layer = model[0]
    assert layer.keep_int4_if_exact(weight)
    assert pack_cpu_linears(model, available_bytes=None) == 1 and layer.onednn is not None
    calls: list[int] = []
    real = packed_linear

    def counting(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, packed, bias)

    monkeypatch.setattr(linear_module, "packed_linear", counting)
    # the 4-bit kernels keep few rows (the GEMV up to 4, the C GEMM up to 16 where it runs)
    few = cpu_native.GEMM_MAX_ROWS if layer.q4_panels is not None else INT4_MAX_ROWS
    many = torch.randn(few + 4, 128).to(torch.bfloat16)
    out = layer(many)
    layer(many[:few])
    assert calls == [few + 4]
    truth = many.double() @ weight.double().t()
    assert (out.double() - truth).abs().max() <= 2e-2 * truth.abs().max()


def test_pack_cpu_linears_respects_the_switch_and_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(linear_with(torch.randn(64, 128)))
    assert pack_cpu_linears(model, available_bytes=4 * 64 * 128 * 2 - 1) == 0  # the copy would not fit
    monkeypatch.setenv(ONEDNN_ENV, "0")
    assert pack_cpu_linears(model, available_bytes=None) == 0
    assert model[0].onednn is None
