"""FP8 (e4m3) weights per output channel: the scaled GEMM (W8A8) above GEMV_MAX_ROWS rows, a GEMV below.

Above GEMV_MAX_ROWS rows, y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n], xq and wq in
float8_e4m3fn (max 448): on CUDA one Triton kernel quantizes the activations (a row per program) and
torch._scaled_mm (cuBLASLt's FP8 GEMM on Hopper) multiplies with both scales and the bias fused; elsewhere the
same numbers are computed in float32 (an emulation: the CPU has no FP8 GEMM worth using, so the activations are
still rounded to e4m3 exactly as on the GPU, and the weights are dequantized).

Up to GEMV_MAX_ROWS rows (decode) cuBLASLt's tensor-core GEMM does not stream the weight at bandwidth, and the
quantizer is one more launch per linear: `fp8_gemv` reads the e4m3 weight once, widens it in registers (exact)
and multiplies the 16-bit activations as they are (W8A16: no activation rounding), scales and bias in the same
launch, split-K finished in it (lmserve/kernels/split_k.py). One row runs the CUDA C kernel of
kernels/cuda/fp8_gemv.cu where NVRTC builds it (e4m3 pairs widened by one conversion each and multiplied on the
tensor cores, the same layout and numbers), more rows and any other case the Triton kernel.

The kernels that make a linear's input (RMSNorm, SiLU-and-mul) can quantize it themselves: they return an
Fp8Activation, the rows as e4m3 with their scales (the numbers per_token_quant_fp8 gives on the 16-bit output
they would have written), and fp8_linear takes it straight into torch._scaled_mm.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lmserve.kernels import cuda_jit
from lmserve.kernels._triton import HAS_TRITON, jit, pdl_enabled, pdl_enter, pdl_options, tl
from lmserve.kernels.int8_gemm import per_token_quant
from lmserve.kernels.split_k import choose_splits, finish_split, split_partials, tile_locks

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12
"""Floor of a scale: an all-zero row quantizes to zeros instead of dividing by zero."""
GEMV_MAX_ROWS = 16
"""Rows up to which CUDA runs fp8_gemv (bf16/fp16 activations, no per-token quantization)."""


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]): scale = absmax / 448, q = round(x / scale)."""
    absmax = x.float().abs().amax(dim=-1, keepdim=True)
    # a tensor divisor: torch on CUDA turns division by a Python scalar into a multiply by its reciprocal,
    # which rounds differently from the IEEE division of the Triton kernel and of the CPU
    scale = (absmax / torch.full_like(absmax, FP8_MAX)).clamp_min(MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] on CUDA -> (e4m3 [M, K], float32 scale [M, 1]): quantize_rows_fp8's numbers in one launch."""
    return per_token_quant(x, FP8, FP8_MAX, MIN_SCALE)


def scaled_mm_supported(in_features: int, out_features: int) -> bool:
    """torch._scaled_mm's shape rule: both matrix dims of the weight a multiple of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


@dataclass(frozen=True)
class Fp8Activation:
    """A linear's input rows quantized per token: e4m3 q [M, K], float32 scale [M, 1]; dtype is that of the
    activations they were quantized from (and of the linear's output)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def takes_fp8_activation(num_rows: int, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether fp8_linear quantizes num_rows activation rows for this weight (and so takes an Fp8Activation
    made by the kernel before it): CUDA, above GEMV_MAX_ROWS, a shape torch._scaled_mm takes."""
    return (
        device.type == "cuda"
        and HAS_TRITON
        and num_rows > GEMV_MAX_ROWS
        and scaled_mm_supported(in_features, out_features)
    )


def fp8_linear(
    x: torch.Tensor | Fp8Activation,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] @ (e4m3 weight [N, K] * weight_scale [N, 1])^T + bias, in x's dtype.

    Up to GEMV_MAX_ROWS rows of 16-bit activations: fp8_gemv (the activations stay unquantized). cuBLASLt's
    row-wise scaled FP8 GEMM writes bfloat16 only: other activation dtypes get its output cast. An Fp8Activation
    (x already quantized) goes straight to the GEMM.
    """
    if isinstance(x, Fp8Activation):
        return fp8_scaled_mm(x, weight, weight_scale, bias)
    if x.is_cuda and HAS_TRITON and gemv_supported(x):
        return fp8_gemv(x, weight, weight_scale, bias)
    if x.is_cuda and HAS_TRITON and scaled_mm_supported(weight.shape[1], weight.shape[0]):
        return fp8_scaled_mm(Fp8Activation(*per_token_quant_fp8(x), x.dtype), weight, weight_scale, bias)
    return fp8_linear_ref(x, weight, weight_scale, bias)


def fp8_scaled_mm(
    x: Fp8Activation, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The quantized rows times the e4m3 weight, both scales and the bias in cuBLASLt's epilogue (torch's
    float32 emulation off CUDA), in x.dtype."""
    if not x.q.is_cuda:
        return fp8_scaled_mm_ref(x, weight, weight_scale, bias)
    out = torch._scaled_mm(
        x.q,
        weight.t(),
        scale_a=x.scale,
        scale_b=weight_scale.t(),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )
    return out if x.dtype == torch.bfloat16 else out.to(x.dtype)


def gemv_supported(x: torch.Tensor) -> bool:
    return x.shape[0] <= GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)


@jit
def _gemv_weight_tile(w_rows, ks, k_end, col_mask, EVEN: tl.constexpr):  # noqa: N803 (a constexpr)
    """_fp8_gemv_kernel's [BLOCK_N, BLOCK_K] weight tile at inputs ks (unmasked where every tile is whole)."""
    if EVEN:
        return tl.load(w_rows + ks[None, :])
    return tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & (ks < k_end)[None, :], other=0.0)


@jit
def _gemv_row_tile(x_ptr, ks, k_end, EVEN: tl.constexpr):  # noqa: N803 (a constexpr)
    """One row's inputs ks, as _gemv_weight_tile."""
    if EVEN:
        return tl.load(x_ptr + ks)
    return tl.load(x_ptr + ks, mask=ks < k_end, other=0.0)


@jit
def _add_norm_tile(x_ptr, res_ptr, nw_ptr, ks, k_end, rstd, EVEN: tl.constexpr):  # noqa: N803 (a constexpr)
    """Inputs ks of norm(x + residual) * weight, rounded as rms_norm rounds them (the sum and the normed value to
    x's dtype, the product to the weight's promotion with it)."""
    h = _gemv_row_tile(x_ptr, ks, k_end, EVEN) + _gemv_row_tile(res_ptr, ks, k_end, EVEN)
    normed = (h.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty)
    return (_gemv_row_tile(nw_ptr, ks, k_end, EVEN).to(tl.float32) * normed.to(tl.float32)).to(
        x_ptr.dtype.element_ty
    )


@jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr, res_ptr, res_out_ptr, nw_ptr, eps,
    M, N, K, k_per_split, num_splits, stride_xm, stride_wn, stride_pm, stride_om,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN: tl.constexpr, ADD_NORM: tl.constexpr = False,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """One program = BLOCK_N output channels x one K split, for all M (<= BLOCK_M) rows.

    USE_DOT: e4m3 -> x's dtype (exact) and a tensor-core dot with the rows padded to BLOCK_M; otherwise (one row)
    e4m3 -> float32 and multiply-adds on the CUDA cores, one sum over K at the end.
    ADD_NORM (one row): the input is RMSNorm(x + residual) * nw, made here: every program first sums the squares of
    the whole row x + residual (the first program also stores it at res_out_ptr, the new residual), then normalizes
    its own inputs as it reads them, so the norm takes no launch of its own.
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if PDL and not USE_DOT:  # one row: the first tile's weights load while the kernel before still runs
        ks = k_start + lanes  # every split holds at least one tile (num_splits = ceil(blocks / per split))
        w_first = _gemv_weight_tile(w_rows, ks, k_end, col_mask, EVEN)
    pdl_enter(PDL)  # x (and the split counters) only after the kernel before has finished
    rstd = 0.0
    if ADD_NORM:
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):  # the whole row, whatever this program's split
            ks = k0 + lanes
            h = _gemv_row_tile(x_ptr, ks, K, EVEN) + _gemv_row_tile(res_ptr, ks, K, EVEN)
            if (pid_n == 0) & (split == 0):
                tl.store(res_out_ptr + ks, h, mask=ks < K)
            squares += h.to(tl.float32) * h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(squares, 0) / K + eps)
    k_first = k_start
    if PDL and not USE_DOT:
        ks = k_start + lanes
        if ADD_NORM:
            xk = _add_norm_tile(x_ptr, res_ptr, nw_ptr, ks, k_end, rstd, EVEN)
        else:
            xk = _gemv_row_tile(x_ptr, ks, k_end, EVEN)
        acc2 += w_first.to(tl.float32) * xk.to(tl.float32)[None, :]
        k_first = k_start + BLOCK_K
    for k0 in range(k_first, k_end, BLOCK_K):
        ks = k0 + lanes
        w = _gemv_weight_tile(w_rows, ks, k_end, col_mask, EVEN)
        if USE_DOT:
            a = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :],
                mask=row_mask[:, None] & (ks < k_end)[None, :],
                other=0.0,
            )
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
        else:
            if ADD_NORM:
                xk = _add_norm_tile(x_ptr, res_ptr, nw_ptr, ks, k_end, rstd, EVEN)
            else:
                xk = _gemv_row_tile(x_ptr, ks, k_end, EVEN)
            acc2 += w.to(tl.float32) * xk.to(tl.float32)[None, :]
    if not USE_DOT:
        acc = tl.sum(acc2, 1)[None, :]
    total = acc
    if HAS_SCALE:
        total = acc * tl.load(ws_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:  # added once: by the first split
        if split == 0:
            total += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    finish_split(
        total, part_ptr, lock_ptr, out_ptr, rows, cols, out_mask, pid_n, split, num_splits,
        stride_pm, stride_om, N, M, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip


WIDE_N = 16384
"""Output widths from which a one-row program takes 16 channels instead of 8."""


def gemv_options(num_rows: int, out_features: int) -> dict[str, int]:
    """Launch settings by row count (H200 sweeps, benchmarks/RESULTS.md): one row multiply-adds on the CUDA
    cores in narrow programs, 8 channels (16 from WIDE_N) x 256 bytes of K, 8 programs per SM (Llama-3-8B layer
    ~79 against 83 us with 32 channels and 4 per SM); more rows take the tensor-core dot over 32 channels."""
    if num_rows == 1:
        block_n, programs_per_sm = (16 if out_features >= WIDE_N else 8), 8
    else:
        block_n, programs_per_sm = 32, 4
    return {
        "block_n": block_n,
        "block_k": 256,
        "num_warps": 4,
        "programs_per_sm": programs_per_sm,
        "use_dot": int(num_rows != 1),
        "num_stages": 3,
    }


CUDA_GEMV_SOURCE = "fp8_gemv.cu"
CUDA_TILE_N = 16
"""Output channels per CTA of the CUDA GEMV (one m16n8k16 tile's rows)."""
CUDA_MAX_K_PER_CTA = 16384
"""Inputs one CTA of the CUDA GEMV takes at most (its x slice: 32 KB of dynamic shared memory as float16)."""
CUDA_OPTIONS = ("warps", "unroll", "splits", "pdl")
CUDA_VARIANTS = {(4, 2), (4, 4), (8, 2), (8, 4)}
"""(warps, unroll) pairs kernels/cuda/fp8_gemv.cu is built with; a chunk is 64 * unroll inputs."""


def cuda_gemv_available(device: torch.device) -> bool:
    """Whether the CUDA C FP8 GEMV (kernels/cuda/fp8_gemv.cu) compiles and loads on this device."""
    return cuda_jit.available_on(CUDA_GEMV_SOURCE, device)


def cuda_gemv_runs(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> bool:
    """Whether the CUDA GEMV takes this call: one 16-bit row, an e4m3 weight with channel scales, K a multiple of
    16 with 16-byte aligned rows, the output (and bias, if any) in x's dtype."""
    return (
        x.shape[0] == 1
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == FP8
        and weight_scale is not None
        and weight_scale.dtype == torch.float32
        and out_dtype in (None, x.dtype)
        and (bias is None or bias.dtype == x.dtype)
        and weight.shape[1] % 16 == 0
        and weight.data_ptr() % 16 == 0
        and x.data_ptr() % 16 == 0
        and cuda_gemv_available(x.device)
    )


def cuda_gemv_options(in_features: int, device: torch.device) -> dict[str, int]:
    """Launch options of the CUDA GEMV, from the H100 sweep (benchmarks/RESULTS.md, bench_decode_gemms --fp8-cuda):
    8 warps, 2 x 64 inputs a chunk, K split only where it exceeds CUDA_MAX_K_PER_CTA (splitting the 256-tile
    o and down projections measured slower), a programmatic launch on sm_90+ unless LMSERVE_PDL=0 (_triton.pdl_enabled)."""
    return {
        "warps": 8,
        "unroll": 2,
        "splits": math.ceil(in_features / CUDA_MAX_K_PER_CTA),
        "pdl": int(pdl_enabled(device)),
    }


def _launch_cuda_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    **options: int,
) -> None:
    n, k = weight.shape
    opts = cuda_gemv_options(k, x.device) | options
    warps, unroll = opts["warps"], opts["unroll"]
    if (warps, unroll) not in CUDA_VARIANTS:
        raise ValueError(f"(warps, unroll) must be one of {sorted(CUDA_VARIANTS)}, got {(warps, unroll)}")
    chunk = 64 * unroll
    k_per_cta = math.ceil(math.ceil(k / max(1, opts["splits"])) / chunk) * chunk
    if k_per_cta > CUDA_MAX_K_PER_CTA:
        raise ValueError(f"{opts['splits']} splits leave {k_per_cta} inputs a CTA, over {CUDA_MAX_K_PER_CTA}")
    tiles, splits = math.ceil(n / CUDA_TILE_N), math.ceil(k / k_per_cta)
    partial = split_partials(splits, 1, n, x.device)
    device = cuda_jit.device_index(x.device)
    dtype = "bf16" if x.dtype == torch.bfloat16 else "f16"
    pdl = opts["pdl"]
    if pdl not in (0, 1):
        raise ValueError(f"pdl must be 0 or 1, got {pdl}")
    name = f"fp8_gemv_{dtype}_w{warps}_u{unroll}" + ("_pdl" if pdl else "")
    handle = cuda_jit.function(CUDA_GEMV_SOURCE, name, device)
    args = [
        ctypes.c_void_p(x.data_ptr()),
        ctypes.c_void_p(weight.data_ptr()),
        ctypes.c_void_p(weight_scale.data_ptr()),
        ctypes.c_void_p(out.data_ptr() if bias is None else bias.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_void_p(partial.data_ptr()),
        ctypes.c_void_p(tile_locks(x.device).data_ptr()),
        ctypes.c_int(n),
        ctypes.c_int(k),
        ctypes.c_int(k_per_cta),
        ctypes.c_longlong(weight.stride(0)),
        ctypes.c_int(bias is not None),
    ]
    stream = torch.cuda.current_stream(x.device).cuda_stream
    cuda_jit.launch(
        handle, (tiles, splits, 1), (32 * warps, 1, 1), args, stream, 2 * k_per_cta, programmatic=bool(pdl)
    )


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
    kernel: str | None = None,
    **options: int,
) -> torch.Tensor:
    """x [M <= 16, K] (bf16/fp16) @ (e4m3 weight [N, K] * weight_scale [N, 1])^T + bias, one launch; the output in
    out_dtype (default x's: float32 spares the lm_head's logits a widening copy, the sums are float32 anyway).

    One row runs the CUDA C kernel where cuda_gemv_runs says it can (options warps, unroll, splits and pdl
    override its launch), unless the options name the Triton kernel's settings; kernel = "cuda" / "triton" forces
    one. A 16-bit weight with weight_scale None runs the Triton GEMV (benchmarks/bench_quant_kernels.py times it
    against cuBLAS). The Triton options override block_n, block_k, num_warps, num_stages, programs_per_sm, use_dot
    and k_per_split (a multiple of block_k).
    """
    num_rows, k = x.shape
    n = weight.shape[0]
    if num_rows > GEMV_MAX_ROWS:
        raise ValueError(f"fp8_gemv takes at most {GEMV_MAX_ROWS} rows, got {num_rows}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert weight.is_contiguous() and (weight_scale is None or weight_scale.is_contiguous())
    out = torch.empty(num_rows, n, dtype=out_dtype or x.dtype, device=x.device)
    if num_rows == 0:
        return out
    if kernel is None:
        triton_options = set(options) - set(CUDA_OPTIONS)
        use_cuda = not triton_options and cuda_gemv_runs(x, weight, weight_scale, bias, out_dtype)
    elif kernel in ("cuda", "triton"):
        use_cuda = kernel == "cuda"
        if use_cuda and not cuda_gemv_runs(x, weight, weight_scale, bias, out_dtype):
            raise ValueError("the CUDA FP8 GEMV does not take this call (see cuda_gemv_runs)")
    else:
        raise ValueError(f"kernel must be 'cuda' or 'triton', got {kernel!r}")
    if use_cuda:
        assert weight_scale is not None
        _launch_cuda_gemv(x, weight, weight_scale, bias, out, **options)
        return out
    _launch_triton_gemv(x, weight, weight_scale, bias, out, gemv_options(num_rows, n) | options)
    return out


def _launch_triton_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    opts: dict[str, int],
    add_norm: AddNorm | None = None,
) -> None:
    """_fp8_gemv_kernel over x [M, K] (x contiguous in K, M >= 1) into out [M, N]; add_norm: one row whose input
    is add_norm's RMSNorm of x + its residual (written to its new_residual)."""
    num_rows, k = x.shape
    n = weight.shape[0]
    block_n, block_k = opts["block_n"], opts["block_k"]
    tiles = math.ceil(n / block_n)
    num_blocks = math.ceil(k / block_k)
    per_split = opts.get("k_per_split", 0) // block_k or choose_splits(
        tiles, num_blocks, opts["programs_per_sm"], x.device
    )
    num_splits = math.ceil(num_blocks / per_split)
    partial = split_partials(num_splits, num_rows, n, x.device)
    use_dot = bool(opts["use_dot"]) or num_rows > 1
    if add_norm is not None:
        assert num_rows == 1 and not use_dot, "the fused norm is the one-row kernel's"
        residual, new_residual, norm_weight, eps = add_norm
    else:
        residual = new_residual = norm_weight = x  # unused placeholders
        eps = 0.0
    _fp8_gemv_kernel[(tiles, num_splits)](
        x, weight, out if weight_scale is None else weight_scale, out if bias is None else bias, out, partial,
        tile_locks(x.device), residual, new_residual, norm_weight, eps, num_rows, n, k, per_split * block_k,
        num_splits, x.stride(0), weight.stride(0), partial.stride(0), out.stride(0),
        HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=16 if use_dot else 1,
        BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, EVEN=k % block_k == 0 and n % block_n == 0,
        ADD_NORM=add_norm is not None, num_warps=opts["num_warps"], num_stages=opts["num_stages"],
        **pdl_options(x.device),
    )  # fmt: skip


class AddNorm(NamedTuple):
    """The one-row GEMV's fused input: RMSNorm(x + residual) * norm_weight, the sum written to new_residual."""

    residual: torch.Tensor  # [1, K], x's dtype, contiguous
    new_residual: torch.Tensor  # [1, K], written: x + residual
    norm_weight: torch.Tensor  # [K], x's dtype
    eps: float


def add_norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
    **options: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * norm_weight @ W^T + bias, x + residual) of one row [1, K] in one launch of the
    Triton GEMV: what fused_add_rms_norm followed by fp8_gemv computes (the norm's sum of squares in another
    order), without the norm's launch. The new residual is a new tensor (every program reads the old one)."""
    assert x.shape[0] == 1 and x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape
    assert norm_weight.dtype == x.dtype == residual.dtype and norm_weight.is_contiguous()
    out = torch.empty(1, weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    new_residual = torch.empty_like(x)
    opts = gemv_options(1, weight.shape[0]) | options
    _launch_triton_gemv(
        x, weight, weight_scale, bias, out, opts, AddNorm(residual, new_residual, norm_weight, eps)
    )
    return out, new_residual


def fp8_gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """fp8_gemv in float32: the unquantized activations times the widened weight, then the channel scales."""
    out = (x.float() @ weight.float().t()) * weight_scale.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same product in float32 (the CPU path and the GPU kernels' reference)."""
    return fp8_scaled_mm_ref(Fp8Activation(*quantize_rows_fp8(x), x.dtype), weight, weight_scale, bias)


def fp8_scaled_mm_ref(
    x: Fp8Activation, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """fp8_scaled_mm in float32: the widened e4m3 operands' product times both scales."""
    out = (x.q.float() @ weight.float().t()) * x.scale * weight_scale.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def requantize_blocks_per_channel(
    weight: torch.Tensor, block_scale_inv: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled e4m3 [N, K] with scales [ceil(N / bn), ceil(K / bk)] -> per-channel e4m3 and [N, 1] scales.

    torch._scaled_mm takes per-row and per-column scales, not blocks: the weight is dequantized in float32 and
    rounded again per output channel (a second rounding of the values whose block scale is below the row's).
    """
    block_n, block_k = block
    n, k = weight.shape
    scales = block_scale_inv.float().repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return quantize_rows_fp8(weight.float() * scales)
