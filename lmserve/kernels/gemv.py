"""One-row GEMV over 16-bit weights (bf16/fp16 decode at batch 1): fp8_gemv's kernel without scales, used only
for the shapes where it measured faster than cuBLAS.

At one row cuBLAS picks split-K GEMMs with a second reduce kernel for Llama-3-8B's o projection and 256-column
tiles that leave the lm_head at 1.7 TB/s in the engine (235 us for 403 MB, H200 profile in RESULTS.md); the GEMV
streams each weight once with split-K finished in its own launch, and can write the logits in float32.
"""

from __future__ import annotations

import torch

from lmserve.kernels._triton import HAS_TRITON
from lmserve.kernels.fp8 import fp8_gemv

MAX_IN_FEATURES = 4096
"""Measured faster up to this K (Llama-3-8B's qkv, o, gate_up and lm_heads); at K = 14336 (down) cuBLAS is as fast."""
MIN_OUT_FEATURES = 4096
"""Smaller outputs were not measured: they stay on cuBLAS."""


def one_row_gemv_options(in_features: int, out_features: int) -> dict[str, int] | None:
    """fp8_gemv's launch options for x [1, in_features] @ W [out_features, in_features]^T, or None where cuBLAS
    stays (benchmarks/bench_decode_gemms.py --bf16-sweep, H200, RESULTS.md "H200, 2026-12-03 (helper g3)")."""
    if in_features > MAX_IN_FEATURES or out_features < MIN_OUT_FEATURES:
        return None
    if 16384 <= out_features < 32768:  # gate_up: 16 channels, 8 programs per SM (60.1 against cuBLAS 62.0 us)
        return {
            "block_n": 16,
            "block_k": 256,
            "num_warps": 4,
            "num_stages": 2,
            "programs_per_sm": 8,
            "use_dot": 0,
        }
    # qkv 16.7 / o 12.8 / lm_head (49152) 96.0 against cuBLAS 17.1 / 13.7 / 106.7 us
    return {"block_n": 8, "block_k": 256, "num_warps": 4, "num_stages": 4, "programs_per_sm": 4, "use_dot": 0}


def runs_one_row_gemv(x: torch.Tensor, weight: torch.Tensor, options: dict[str, int] | None) -> bool:
    """x is one 16-bit row on CUDA, the weight a contiguous matrix of its dtype whose shape has GEMV options."""
    return (
        options is not None
        and x.is_cuda
        and HAS_TRITON
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.is_contiguous()
    )


def one_row_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    options: dict[str, int],
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T + bias in one launch (out_dtype: x's by default)."""
    return fp8_gemv(x, weight, None, bias, out_dtype, **options)


def one_row_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """float32 logits [1, V] of one hidden row through the GEMV, or None where it does not run (cuBLAS then)."""
    options = one_row_gemv_options(weight.shape[1], weight.shape[0])
    if not runs_one_row_gemv(hidden, weight, options):
        return None
    assert options is not None
    return one_row_linear(hidden, weight, None, options, torch.float32)
