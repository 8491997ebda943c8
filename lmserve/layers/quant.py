"""Quantized linear layers at run time: AWQ W4A16 and W8A8 int8 (FP8 W8A8 lives in layers/fp8.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmserve.kernels._triton import HAS_TRITON
from lmserve.kernels.awq_dequant import PACK_NUM
from lmserve.kernels.awq_dequant import awq_dequantize as awq_dequantize_cuda
from lmserve.kernels.int8_gemm import int8_gemm, per_token_quant_int8, quantize_rows_int8
from lmserve.kernels.w4a16 import (
    GEMV_MAX_ROWS,
    cuda_gemv_available,
    dequantize_w4,
    prefers_tinygemm,
    repack_awq,
    supports_group_size,
    tinygemm_matmul,
    tinygemm_pack,
    tinygemm_supported,
    w4a16_add_norm_gemv,
    w4a16_matmul,
    w4a16_silu_gemv,
)
from lmserve.layers.fp8 import Fp8Linear, fp8_layout
from lmserve.layers.quant_formats import awq_dequantize, check_group_size, quant_method


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class AWQLinear(nn.Module):
    """W4A16 in the AutoAWQ GEMM layout; on CPU the weight is dequantized per call, then one matmul."""

    output_dims = {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}
    input_dims = {"qweight": 0, "qzeros": 0, "scales": 0}  # qzeros/scales rows are groups of inputs

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        check_group_size(in_features, group_size)
        if out_features % PACK_NUM:
            raise ValueError(f"AWQ needs out_features ({out_features}) to be a multiple of {PACK_NUM}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        num_groups = in_features // group_size
        self.qweight = _frozen(torch.zeros(in_features, out_features // PACK_NUM, dtype=torch.int32))
        self.qzeros = _frozen(torch.zeros(num_groups, out_features // PACK_NUM, dtype=torch.int32))
        self.scales = _frozen(torch.zeros(num_groups, out_features, dtype=torch.float16))
        self.bias = _frozen(torch.zeros(out_features)) if bias else None

        self.w4: Any = None
        """The weight repacked for the CUDA kernels (lmserve/kernels/w4a16.py), set by prepare_for_inference."""
        self.tinygemm: Any = None
        """A second copy in tinygemm's layout for bfloat16 models, where prefers_tinygemm (lmserve/kernels/w4a16.py)."""

    def prepare_for_inference(self, activation_dtype: torch.dtype | None = None) -> None:
        """On CUDA: repack into the kernels' K-interleaved layout (and tinygemm's, for a bfloat16
        activation_dtype) once, and free the AutoAWQ tensors."""
        if not (self.qweight.is_cuda and HAS_TRITON):
            return
        if self.w4 is None and supports_group_size(self.group_size):
            if activation_dtype == torch.bfloat16 and tinygemm_supported(
                self.in_features, self.out_features, self.group_size
            ):
                self.tinygemm = tinygemm_pack(
                    self.qweight.data, self.qzeros.data, self.scales.data, self.group_size
                )
            self.w4 = repack_awq(self.qweight.data, self.qzeros.data, self.scales.data, self.group_size)
            for name in ("qweight", "qzeros", "scales"):
                getattr(self, name).data = torch.empty(0, dtype=getattr(self, name).dtype, device="cuda")

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[in, out] weight in `dtype`."""
        if self.w4 is not None:
            return dequantize_w4(self.w4, dtype)
        return awq_dequantize(self.qweight, self.qzeros, self.scales.to(dtype), self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_tinygemm(x):
            out = tinygemm_matmul(x.reshape(-1, x.shape[-1]), self.tinygemm).view(*x.shape[:-1], -1)
        elif self.w4 is not None:  # dequantize in registers (lmserve/kernels/w4a16.py)
            out = w4a16_matmul(x, self.w4)
        elif x.is_cuda and HAS_TRITON:  # group sizes the repacked kernels don't take: dense weight, cuBLAS
            out = x @ awq_dequantize_cuda(self.qweight, self.qzeros, self.scales, self.group_size, x.dtype)
        else:
            out = x @ self.dequantized_weight(x.dtype)
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def silu_gated_forward(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """This projection of silu(gate) * up for gate_up [..., 2 * in_features] = [gate | up] in one launch where
        the one-row CUDA GEMV takes it (w4a16_silu_gemv); None elsewhere (the caller runs the activation first)."""
        rows = gate_up.numel() // max(1, gate_up.shape[-1])
        if (
            self.w4 is None
            or rows != GEMV_MAX_ROWS
            or gate_up.shape[-1] != 2 * self.in_features
            or gate_up.dtype not in (torch.bfloat16, torch.float16)
            or not cuda_gemv_available(gate_up.device)
            or self._takes_tinygemm(gate_up[..., : self.in_features])
        ):
            return None
        out = w4a16_silu_gemv(gate_up, self.w4)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def add_norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(RMSNorm(x + residual) * norm_weight), x + residual) in one launch where the one-row CUDA GEMV takes
        it (w4a16_add_norm_gemv); None elsewhere (the caller norms first)."""
        if (
            self.w4 is None
            or x.shape != (GEMV_MAX_ROWS, self.in_features)
            or residual.shape != x.shape
            or not (x.dtype == residual.dtype == norm_weight.dtype)
            or x.dtype not in (torch.bfloat16, torch.float16)
            or not cuda_gemv_available(x.device)
            or self._takes_tinygemm(x)
        ):
            return None
        out, new_residual = w4a16_add_norm_gemv(x, residual, norm_weight, eps, self.w4)
        return (out + self.bias.to(out.dtype) if self.bias is not None else out), new_residual

    def _takes_tinygemm(self, x: torch.Tensor) -> bool:
        tiny = self.tinygemm
        return (
            tiny is not None
            and x.dtype == torch.bfloat16
            and prefers_tinygemm(
                x.numel() // max(1, x.shape[-1]), self.out_features, x.device, self.in_features
            )
        )


class W8A8Linear(nn.Module):
    """Int8 weights per output channel, int8 activations quantized per token at run time."""

    output_dims = {"weight": 0, "weight_scale": 0, "bias": 0}
    input_dims = {"weight": 1}  # the per-output-channel scales stay whole on a row-parallel rank

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.zeros(out_features, in_features, dtype=torch.int8))
        self.weight_scale = _frozen(torch.ones(out_features, 1, dtype=torch.float32))
        self.bias = _frozen(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.is_cuda and HAS_TRITON:  # Triton: per-token quantization, int8 GEMM with both scales fused
            q, x_scale = per_token_quant_int8(flat)
            out = int8_gemm(q, self.weight, x_scale, self.weight_scale, x.dtype)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
            return out.reshape(*x.shape[:-1], self.out_features)
        if x.is_cuda:  # cuBLAS int8 tensor-core GEMM (int32 accumulation), scales applied once in float32
            q, x_scale = quantize_rows_int8(flat)
            out = cuda_int8_matmul(q, self.weight) * x_scale * self.weight_scale.float().t()
            if self.bias is not None:
                out = out + self.bias.float()
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        q, x_scale = quantize_rows_int8(flat)
        accumulated = int8_matmul(q, self.weight.t())
        out = accumulated * x_scale * self.weight_scale.float().t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def cuda_int8_matmul(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] @ weight int8 [N, K]^T -> float32 [M, N] via torch._int_mm (cuBLAS needs M > 16: pad)."""
    num_rows = a.shape[0]
    if num_rows <= 16:
        a = torch.nn.functional.pad(a, (0, 0, 0, 17 - num_rows))
    return torch._int_mm(a, weight.t()).float()[:num_rows]


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> float32 product; torch._int_mm where its shape rules allow."""
    usable = hasattr(torch, "_int_mm") and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0
    if usable:
        try:
            return torch._int_mm(a, b).float()
        except RuntimeError:
            pass  # backend without this shape or device: fall through to the exact float path
    # float32 holds every int8 product sum exactly up to 2**24 / 127**2 ~ 1040 terms per chunk;
    # float64 keeps it exact for any in_features we meet.
    return (a.double() @ b.double()).float()


def prepare_for_inference(model: nn.Module) -> None:
    """Once the weights are in: let each quantized layer convert them for its device's kernels."""
    dtype = activation_dtype(model)
    for module in model.modules():
        if isinstance(module, AWQLinear):
            module.prepare_for_inference(dtype)
        elif isinstance(module, Fp8Linear):
            module.prepare_for_inference()


def activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's compute dtype: that of its first floating parameter outside the quantized layers."""
    quantized = {
        id(p) for m in model.modules() if isinstance(m, AWQLinear | Fp8Linear) for p in m.parameters()
    }
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in quantized), None
    )


def make_quantized_linear(
    in_features: int, out_features: int, bias: bool, quant_config: dict[str, Any]
) -> nn.Module:
    """The quantized module for an HF `quantization_config` (awq gemm, compressed-tensors int8)."""
    method = quant_method(quant_config)
    if method == "awq":
        return AWQLinear(in_features, out_features, bias, int(quant_config["group_size"]))
    if method == "fp8":
        return Fp8Linear(in_features, out_features, bias, *fp8_layout(quant_config))
    return W8A8Linear(in_features, out_features, bias)
