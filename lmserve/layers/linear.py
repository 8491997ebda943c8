"""Linear layers: the plain one (with its CPU 4-bit fast path), and make_linear, which dispatches to quantized linears."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels import cpu_native
from lmserve.kernels.gemv import (
    one_row_add_norm_linear,
    one_row_gemv_options,
    one_row_linear,
    runs_one_row_gemv,
)
from lmserve.kernels.int8_gemm import quantize_rows_int8
from lmserve.layers.cpu_gemm import packed_linear
from lmserve.layers.quant import make_quantized_linear

INT4_GROUP_SIZE = 32
INT4_MAX_ROWS = cpu_native.MAX_ROWS
"""Up to this many rows the CPU 4-bit kernels win (they read 4x fewer bytes than bf16); above, the bf16 GEMM's
compute wins (measured on SmolLM2 shapes on an AVX512-BF16 CPU: int4 is 4x faster at 1 row, 2x slower at 16)."""


class Linear(nn.Module):
    """y = x W^T + b with uninitialized weights (load_weights fills them; init would waste seconds)."""

    output_dims: dict[str, int] = {"weight": 0, "bias": 0}
    input_dims: dict[str, int] = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # CPU, few bf16 rows, a 4-bit exact weight (set by keep_int4_if_exact; at most one of the two):
        # the C kernel's (qs, d, m) (kernels/cpu_native.py), or torch's int4 kernel's (packed, scales_zeros)
        self.q4: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # and, beside the C GEMV's copy, the C GEMM's (pack_q4_panels) for 5-16 rows (a decode of several streams)
        self.q4_panels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.int4: tuple[torch.Tensor, torch.Tensor] | None = None
        # CPU: oneDNN's blocked copy of the weight (layers/cpu_gemm.py), set by pack_cpu_linears
        self.onednn: torch.Tensor | None = None
        # CUDA, one 16-bit row: the Triton GEMV's options where it measured faster than cuBLAS (kernels/gemv.py)
        self.gemv_options = one_row_gemv_options(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_one_row_gemv(x, self.weight, self.gemv_options):
            assert self.gemv_options is not None
            return one_row_linear(x, self.weight, self.bias, self.gemv_options)
        if self.q4 is not None and x.shape[0] <= INT4_MAX_ROWS:
            out = cpu_native.q4_linear(x, *self.q4)
            return out if self.bias is None else out + self.bias
        if self.q4_panels is not None and x.shape[0] <= cpu_native.GEMM_MAX_ROWS:
            out = cpu_native.q4_gemm(x, *self.q4_panels)
            return out if self.bias is None else out + self.bias
        if self.int4 is not None and x.shape[0] <= INT4_MAX_ROWS:
            packed, scales_zeros = self.int4
            if not x.is_contiguous():  # the kernel refuses strided rows
                x = x.contiguous()
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP_SIZE, scales_zeros)
            return out if self.bias is None else out + self.bias
        if self.onednn is not None:
            return packed_linear(x, self.onednn, self.bias)
        return F.linear(x, self.weight, self.bias)

    def add_norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(RMSNorm(x + residual) * norm_weight), x + residual) in one launch where the one-row GEMV fuses the
        norm (kernels/gemv.py one_row_add_norm_linear), else None: the caller norms first."""
        if self.gemv_options is None:
            return None
        return one_row_add_norm_linear(
            x, residual, norm_weight, eps, self.weight, self.bias, self.gemv_options
        )

    @property
    def has_4bit_copy(self) -> bool:
        return self.q4 is not None or self.int4 is not None

    def keep_int4_if_exact(self, weight: torch.Tensor) -> bool:
        """Keep a 4-bit copy of `weight` for few-row inputs when it is exactly 4-bit (GGUF Q4_1, say): lossless.

        Only for bfloat16 weights on the CPU; the dense weight stays for many-row inputs (prefill, big batches).
        The copy is for the C kernel where it runs (`cpu_native.kernel_available()`), else for torch's int4 kernel.
        Call it after the weight is loaded: the copy is not refreshed when the dense weight changes later.
        """
        self.q4 = self.int4 = self.q4_panels = None
        if self.weight.device.type != "cpu" or self.weight.dtype != torch.bfloat16:
            return False
        exact = exact_int4(weight)
        if exact is None:
            return False
        if cpu_native.kernel_available() and cpu_native.shape_supported(*weight.shape):
            self.q4 = cpu_native.pack_q4(*exact)
            if cpu_native.panels_supported(*weight.shape):
                self.q4_panels = cpu_native.pack_q4_panels(*exact)
        else:
            self.int4 = pack_int4(*exact, self.weight.dtype)
        return True


def pack_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], scales [N]): symmetric round-to-nearest per output row."""
    # A lower floor than the activations' 1e-8 (absmax >= 1e-12): rows of tiny weights keep all 255 levels.
    codes, scales = quantize_rows_int8(weight.detach(), min_scale=1e-12 / 127)
    return codes, scales.squeeze(1).to(dtype)


def int8_linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ (int8 weight * scales)^T with torch's CPU weight-only int8 kernel."""
    return torch.ops.aten._weight_int8pack_mm(x, packed[0], packed[1])


def exact_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """weight [N, K] -> (codes [N, K] uint8, scale, low [N, K / 32] float32), or None when not 4-bit exact.

    Exact means: every group of INT4_GROUP_SIZE inputs holds at most 16 evenly spaced values spanning its
    min..max (asymmetric 4-bit, as llama.cpp's Q4_1 stores them), so weight = scale * code + low recovers them.
    """
    num_out, num_in = weight.shape
    if num_in % INT4_GROUP_SIZE or num_out % 16:
        return None
    cpu_float = weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
    if cpu_float and cpu_native.kernel_available():
        return cpu_native.exact_q4(weight.detach())  # the same in one pass (kernels/cpu/exact_q4.c)
    groups = weight.detach().float().reshape(num_out, num_in // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - low) / 15
    codes = ((groups - low) / scale.clamp_min(1e-30)).round_().clamp_(0, 15)
    if bool(((codes * scale + low - groups).abs() > 1e-3 * scale + 1e-7).any()):
        return None
    return codes.reshape(num_out, num_in).to(torch.uint8), scale.squeeze(2), low.squeeze(2)


def pack_int4(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_int4's codes, scale and low -> (packed, scales_zeros) for torch's CPU int4 kernel."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    # the kernel computes (code - 8) * scale + zero, with scale and zero in the activations' dtype
    scales_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1)
    return packed, scales_zeros.to(dtype).contiguous()


def pack_int4_if_exact(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """weight [N, K] -> torch's CPU int4 kernel's (packed, scales_zeros), or None when not 4-bit exact."""
    exact = exact_int4(weight)
    return None if exact is None else pack_int4(*exact, dtype)


def make_linear(
    in_features: int, out_features: int, bias: bool, quant_config: dict[str, Any] | None
) -> nn.Module:
    """A linear layer; quantized (lmserve.layers.quant) when quant_config is set.

    Every returned module exposes `output_dims`: param name -> the dim holding output features,
    so fused projections (qkv, gate_up) can be concatenated shard by shard at load time, and
    `input_dims`: param name -> the dim holding input features (what a row-parallel rank slices).
    Dtype and device come from torch's defaults (the model builds under them).
    """
    if quant_config is None:
        return Linear(in_features, out_features, bias)
    return make_quantized_linear(in_features, out_features, bias, quant_config)


def output_dims_of(module: nn.Module) -> dict[str, int]:
    """The `output_dims` map of a linear built by make_linear."""
    dims = getattr(module, "output_dims", None)
    if not isinstance(dims, dict):
        raise TypeError(f"{type(module).__name__} lacks output_dims, so its shards cannot be fused")
    return dims


def input_dims_of(module: nn.Module) -> dict[str, int]:
    """The `input_dims` map of a linear built by make_linear (params absent from it are not split by input)."""
    dims = getattr(module, "input_dims", None)
    if not isinstance(dims, dict):
        raise TypeError(f"{type(module).__name__} lacks input_dims, so it cannot be split by input features")
    return dims
