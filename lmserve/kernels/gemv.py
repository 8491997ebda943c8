"""One-row GEMV over 16-bit weights (bf16/fp16 decode at batch 1): fp8_gemv's kernel without scales, used only
for the shapes where it measured faster than cuBLAS.

At one row cuBLAS runs Llama-3-8B's o and down projections as split-K GEMMs with a second reduce kernel each; the
GEMV streams each weight once with its split-K finished in the same launch, and writes the lm_head's logits in
float32 (no widening copy).
"""

from __future__ import annotations

import torch

from lmserve.kernels._triton import DECODE_FUSIONS, HAS_TRITON
from lmserve.kernels.fp8 import add_norm_gemv, fp8_gemv

FUSE_NORM = "norm" in DECODE_FUSIONS
"""One-row linears that take the residual add and RMSNorm into their GEMV (_triton.FUSION_ENV; off: it lost on
the H100, benchmarks/RESULTS.md 2026-12-07 evening). Read by models/llama.py add_norm_linear."""
MAX_IN_FEATURES = 14336
"""Measured up to this K (Llama-3-8B's down projection); larger inputs were not measured and stay on cuBLAS."""
MIN_OUT_FEATURES = 4096
"""Smaller outputs were not measured: they stay on cuBLAS."""
VOCAB_OUT_FEATURES = 32768
"""From this many outputs (an lm_head) wider programs: 16 channels x 256 inputs."""


def one_row_gemv_options(in_features: int, out_features: int) -> dict[str, int] | None:
    """fp8_gemv's launch options for x [1, in_features] @ W [out_features, in_features]^T, or None where cuBLAS
    stays. From two H200 sweeps of 126 settings (benchmarks/bench_decode_gemms.py --bf16-sweep, RESULTS.md "H200,
    2026-12-03 (helper g3)"): 4 channels x 1024 inputs per program, 4 programs per SM, for every Llama-3-8B layer
    GEMM (qkv 16.3, o 12.0, gate_up 60.0, down 33.7 us against cuBLAS 17.4, 14.0, 64.9, 35.3 in the same call);
    16 x 256 for the 128256-row lm_head (238.5 against 283.6 us)."""
    if in_features > MAX_IN_FEATURES or out_features < MIN_OUT_FEATURES:
        return None
    return _VOCAB_OPTIONS if out_features >= VOCAB_OUT_FEATURES else _LAYER_OPTIONS


_COMMON = {"num_warps": 4, "programs_per_sm": 4, "use_dot": 0}
_LAYER_OPTIONS = _COMMON | {"block_n": 4, "block_k": 1024, "num_stages": 4}
_VOCAB_OPTIONS = _COMMON | {"block_n": 16, "block_k": 256, "num_stages": 2}
"""Built once: the options are looked up on every decode step (read only; fp8_gemv merges them into a new dict)."""
_ADD_NORM_TILE = _VOCAB_OPTIONS
"""The fused norm's programs, the lm_head's: 16 channels each, not the layers' 4. Every program reads the row's x, residual and
norm weight beside its weights, and first sums the row's squares; at 4 channels that would re-read as many bytes
as the weights themselves (qkv: 1,536 programs of 24 KB each), at 16 about a third as many. Not timed yet."""


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
    return fp8_gemv(x, weight, None, bias, out_dtype, "triton", **options)


def one_row_add_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    options: dict[str, int],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(RMSNorm(x + residual) * norm_weight @ weight^T + bias, x + residual) in one launch of the GEMV, or None
    where it does not take the call (not one contiguous row of the weight's dtype). Whether to fuse at all is
    FUSE_NORM's, read by the caller (models/llama.py add_norm_linear)."""
    if not (
        x.is_contiguous()
        and residual.is_contiguous()
        and residual.dtype == norm_weight.dtype == x.dtype
        and norm_weight.is_contiguous()
        and runs_one_row_gemv(x, weight, options)
    ):
        return None
    return add_norm_gemv(
        x, residual, norm_weight, eps, weight, None, bias, None, **(options | _ADD_NORM_TILE)
    )


def one_row_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """float32 logits [1, V] of one hidden row through the GEMV, or None where it does not run (cuBLAS then)."""
    options = one_row_gemv_options(weight.shape[1], weight.shape[0])
    if not runs_one_row_gemv(hidden, weight, options):
        return None
    assert options is not None
    return one_row_linear(hidden, weight, None, options, torch.float32)
