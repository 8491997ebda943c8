"""W4A16 (AWQ) and W8A8 int8 Triton kernels against their torch references, run on the CPU by Triton's interpreter.

TRITON_INTERPRET must be set before Triton is imported, so the one test pytest runs here starts a child pytest
over this same file with it set (as test_kernels_interpret.py); the per-kernel tests run in that child.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmserve.kernels.testing import in_interpreter_child, run_under_interpreter

IN_CHILD = in_interpreter_child()
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child process")


def test_quant_kernels_match_references_under_interpreter() -> None:
    run_under_interpreter(__file__, timeout=300)


if IN_CHILD:
    from lmserve.kernels.activation import silu_and_mul, silu_and_mul_fp8
    from lmserve.kernels.awq_dequant import awq_dequantize, awq_dequantize_ref, awq_gemm_ref, pack_awq
    from lmserve.kernels.fp8 import (
        Fp8Activation,
        fp8_gemv,
        fp8_gemv_ref,
        fp8_linear,
        fp8_scaled_mm_ref,
        per_token_quant_fp8,
        quantize_rows_fp8,
    )
    from lmserve.kernels.int8_gemm import (
        int8_gemm,
        int8_gemm_ref,
        per_token_quant_int8,
        per_token_quant_int8_ref,
    )
    from lmserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm
    from lmserve.kernels.testing import relative_error
    from lmserve.kernels.w4a16 import dequantize_w4, dequantize_w4_ref, repack_awq, w4a16_matmul

DTYPE = torch.float16  # numpy, under the interpreter, has no bfloat16


def random_awq(k: int, n: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """qweight, qzeros, scales of a random [k, n] int4 weight with random zero points."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=generator)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=generator)
    scales = (torch.rand(k // group_size, n, generator=generator) * 0.02 + 0.005).half()
    return pack_awq(q), pack_awq(zeros), scales


@child_only
def test_awq_dequantize_matches_reference_exactly() -> None:
    qweight, qzeros, scales = random_awq(64, 40, 16)
    assert torch.equal(
        awq_dequantize(qweight, qzeros, scales, 16), awq_dequantize_ref(qweight, qzeros, scales, 16)
    )


@child_only
@pytest.mark.parametrize("k,n,group_size", [(256, 40, 32), (576, 48, 64), (512, 16, 256)])
def test_w4_repack_dequantizes_to_the_awq_weight(k: int, n: int, group_size: int) -> None:
    qweight, qzeros, scales = random_awq(k, n, group_size, seed=k)
    weight = repack_awq(qweight, qzeros, scales, group_size)
    # K padded to whole 128-row blocks, N to whole 64-column strips
    assert weight.qweight.shape == (-(-n // 64), -(-k // 128) * 128 // 8, 64)
    assert torch.equal(
        dequantize_w4_ref(weight), awq_dequantize_ref(qweight, qzeros, scales, group_size, torch.float32)
    )
    assert torch.equal(
        dequantize_w4(weight, DTYPE), awq_dequantize_ref(qweight, qzeros, scales, group_size, DTYPE)
    )


@child_only
@pytest.mark.parametrize(
    "num_rows,kernel,options",
    [
        (1, "gemv", {"block_n": 16}),  # the heuristic's split: several programs finish through the counters
        (1, "gemv", {"block_n": 32, "blocks_per_split": 1}),
        (5, "dot", {"block_m": 16, "block_n": 16}),
        (5, "dot", {"block_m": 16, "block_n": 16, "wide": 1}),  # one dot per group
        (70, "dot", {"block_m": 64, "block_n": 16}),  # 64-row tiles: one dot per group by default
        (20, "dot", {"block_m": 16, "block_n": 32, "blocks_per_split": 1}),
        (3, "dense", {}),
        (1, "swap", {"block_n": 16}),  # the transposed tensor-core kernel, split by the heuristic
        (5, "swap", {"block_n": 32, "blocks_per_split": 1}),
        (16, "swap", {"block_n": 16, "fold": 0}),  # exact weights, the per-group correction
        (20, "swap", {"block_n": 16, "blocks_per_split": 2}),  # two row tiles: counters per tile
        (1, "swap", {"block_n": 16, "fold": 1}),  # weights rounded once to x's dtype, one running dot
        (20, "swap", {"block_n": 32, "fold": 1, "blocks_per_split": 1}),
    ],
)
@pytest.mark.parametrize("k,n,group_size", [(256, 40, 32), (576, 48, 64)])  # 576: K padded, a partial block
def test_w4a16_matmul(num_rows: int, kernel: str, options: dict, k: int, n: int, group_size: int) -> None:
    qweight, qzeros, scales = random_awq(k, n, group_size, seed=k + num_rows)
    weight = repack_awq(qweight, qzeros, scales, group_size)
    x = torch.randn(num_rows, k).to(DTYPE)
    out = w4a16_matmul(x, weight, kernel=kernel, **options)
    assert out.shape == (num_rows, n) and out.dtype == DTYPE
    assert relative_error(out, awq_gemm_ref(x, qweight, qzeros, scales, group_size)) < 2e-3


@child_only
def test_per_token_quant_int8_matches_cpu_quantizer() -> None:
    x = torch.randn(5, 100).to(DTYPE) * torch.tensor([0.01, 1.0, 30.0, 1.0, 1.0]).to(DTYPE)[:, None]
    x[3] = 0  # an all-zero token keeps the minimum scale
    x[4, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5]) / 64  # scale 1/64: exact ties, rounded to even
    q, scale = per_token_quant_int8(x)
    q_ref, scale_ref = per_token_quant_int8_ref(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)


@child_only
@pytest.mark.parametrize("blocks_per_split", [None, 1, 100])
def test_int8_gemm(blocks_per_split: int | None) -> None:
    x_q = torch.randint(-127, 128, (20, 100), dtype=torch.int8)  # K not a multiple of BLOCK_K
    w_q = torch.randint(-127, 128, (48, 100), dtype=torch.int8)
    x_scale, w_scale = torch.rand(20, 1) * 0.01, torch.rand(48, 1) * 0.01
    out = int8_gemm(x_q, w_q, x_scale, w_scale, DTYPE, blocks_per_split, block_m=16, block_n=32, block_k=32)
    assert relative_error(out, int8_gemm_ref(x_q, w_q, x_scale, w_scale, DTYPE)) < 1e-3


@child_only
@pytest.mark.parametrize(
    "num_rows,k,n,options",
    [
        (1, 256, 64, {"block_n": 32, "block_k": 64, "use_dot": 0}),  # whole blocks: unmasked loads
        (1, 200, 48, {"block_n": 32, "block_k": 64, "use_dot": 0, "k_per_split": 64}),  # masked, 4 splits
        (1, 64, 64, {"block_n": 32, "block_k": 64, "use_dot": 0}),  # one tile: under PDL only the peeled one
        (1, 256, 64, {"block_n": 32, "block_k": 64, "use_dot": 1}),
        (5, 200, 48, {"block_n": 32, "block_k": 64, "k_per_split": 128}),  # tensor cores, 2 splits
    ],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_fp8_gemv(
    num_rows: int, k: int, n: int, options: dict, bias: bool, pdl: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pdl: the program as launched under PDL (one row: its first weight tile loaded before pdl_enter, the loop from
    the second); the interpreter has no griddepcontrol, so pdl_enter is a no-op here and the sums must not change."""
    if pdl:
        from lmserve.kernels import fp8

        monkeypatch.setattr(fp8, "pdl_options", lambda device: {"PDL": True})
        monkeypatch.setattr(fp8, "pdl_enter", lambda PDL: None)  # noqa: N803 (the kernel's constexpr)
    generator = torch.Generator().manual_seed(num_rows + k)
    weight, weight_scale = quantize_rows_fp8(torch.randn(n, k, generator=generator) * 0.05)
    x = torch.randn(num_rows, k, generator=generator).to(DTYPE)
    b = torch.randn(n, generator=generator).to(DTYPE) if bias else None
    out = fp8_gemv(x, weight, weight_scale, b, **options)
    assert out.dtype == DTYPE and out.shape == (num_rows, n)
    assert relative_error(out, fp8_gemv_ref(x, weight, weight_scale, b)) < 2e-3


@child_only
@pytest.mark.parametrize(
    "k,n,options",
    [
        (256, 64, {"block_n": 32, "block_k": 64}),  # whole blocks
        (200, 48, {"block_n": 16, "block_k": 64, "k_per_split": 64}),  # masked, 4 splits
        (64, 64, {"block_n": 32, "block_k": 64}),  # one tile
    ],
)
@pytest.mark.parametrize("fp8_weight", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_add_norm_gemv_is_the_norm_then_the_gemv(
    k: int, n: int, options: dict, fp8_weight: bool, pdl: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The residual add and RMSNorm inside the one-row GEMV: the new residual equals fused_add_rms_norm's bit for
    bit (the old one is left alone) and the output that of the norm's output through the same GEMV."""
    from lmserve.kernels import fp8

    if pdl:
        monkeypatch.setattr(fp8, "pdl_options", lambda device: {"PDL": True})
        monkeypatch.setattr(fp8, "pdl_enter", lambda PDL: None)  # noqa: N803 (the kernel's constexpr)
    generator = torch.Generator().manual_seed(k + n)
    x, residual = (torch.randn(1, k, generator=generator).to(DTYPE) for _ in range(2))
    norm_weight = (torch.rand(k, generator=generator) + 0.5).to(DTYPE)
    if fp8_weight:
        weight, weight_scale = quantize_rows_fp8(torch.randn(n, k, generator=generator) * 0.05)
    else:
        weight, weight_scale = (torch.randn(n, k, generator=generator) * 0.05).to(DTYPE), None
    residual_before = residual.clone()
    out, new_residual = fp8.add_norm_gemv(
        x, residual, norm_weight, 1e-5, weight, weight_scale, None, **options
    )
    assert torch.equal(residual, residual_before)
    normed, summed = fused_add_rms_norm(x, residual.clone(), norm_weight, 1e-5)
    assert torch.equal(new_residual, summed)
    unfused = fp8_gemv(normed, weight, weight_scale, None, kernel="triton", **options)
    assert relative_error(out, unfused) < 1e-3
    assert not torch.equal(out, fp8_gemv(x, weight, weight_scale, None, kernel="triton", **options))


def assert_same_fp8_rows(fused: Any, unfused: torch.Tensor) -> None:
    """fused (an Fp8Activation) holds per_token_quant_fp8 of the 16-bit rows the unfused kernel wrote: the scales
    equal quantize_rows_fp8's exactly, the e4m3 values those of the interpreter's own quantizer (its float ->
    e4m3 conversion drops the rounding carry now and then, test_kv_quant_fp8_interpret.py; tests/gpu compare with
    quantize_rows_fp8 bit for bit)."""
    q_ref, scale_ref = per_token_quant_fp8(unfused)
    assert fused.dtype == unfused.dtype and fused.q.shape == unfused.shape
    assert torch.equal(fused.scale, quantize_rows_fp8(unfused)[1]) and torch.equal(fused.scale, scale_ref)
    assert torch.equal(fused.q.view(torch.uint8), q_ref.view(torch.uint8))


@child_only
@pytest.mark.parametrize("num_rows,hidden", [(5, 256), (3, 200)])
@pytest.mark.parametrize("add_residual", [False, True])
def test_rms_norm_fp8_quantizes_the_unfused_output(num_rows: int, hidden: int, add_residual: bool) -> None:
    generator = torch.Generator().manual_seed(hidden + add_residual)
    x = (torch.randn(num_rows, hidden, generator=generator) * 3).to(DTYPE)
    x[1] = 0  # an all-zero row: the minimum scale
    weight = (torch.rand(hidden, generator=generator) + 0.5).to(DTYPE)
    if add_residual:
        residual = torch.randn(num_rows, hidden, generator=generator).to(DTYPE)
        residual[1] = 0
        fused_residual = residual.clone()
        unfused, residual = fused_add_rms_norm(x, residual, weight, 1e-6)
        fused, fused_residual = fused_add_rms_norm(x, fused_residual, weight, 1e-6, fp8=True)
        assert torch.equal(fused_residual, residual)
    else:
        unfused, fused = rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6, fp8=True)
    assert_same_fp8_rows(fused, unfused)


@child_only
@pytest.mark.parametrize("num_rows,intermediate", [(4, 512), (3, 200)])
def test_silu_and_mul_fp8_quantizes_the_unfused_output(num_rows: int, intermediate: int) -> None:
    generator = torch.Generator().manual_seed(intermediate)
    gate_up = (torch.randn(num_rows, 2 * intermediate, generator=generator) * 4).to(DTYPE)
    gate_up[0, :intermediate] = 0  # silu(0) * up = 0: an all-zero row
    assert_same_fp8_rows(silu_and_mul_fp8(gate_up), silu_and_mul(gate_up, block=64))


@child_only
def test_fp8_linear_takes_the_quantized_rows() -> None:
    generator = torch.Generator().manual_seed(3)
    weight, weight_scale = quantize_rows_fp8(torch.randn(48, 400, generator=generator) * 0.05)
    gate_up = torch.randn(20, 800, generator=generator).to(DTYPE)
    bias = torch.randn(48, generator=generator).to(DTYPE)
    out = fp8_linear(silu_and_mul_fp8(gate_up), weight, weight_scale, bias)
    # the unfused path's GEMM on the rows the interpreter's per-token quantizer makes (see assert_same_fp8_rows)
    rows = Fp8Activation(*per_token_quant_fp8(silu_and_mul(gate_up)), DTYPE)
    assert out.dtype == DTYPE and out.shape == (20, 48)
    assert torch.equal(out, fp8_scaled_mm_ref(rows, weight, weight_scale, bias))
