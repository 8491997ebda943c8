"""RMSNorm (Llama's x * w) and Gemma's (1 + w) variant."""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels import cpu_native
from lmserve.kernels._triton import HAS_TRITON
from lmserve.kernels.fp8 import Fp8Activation


class RMSNorm(nn.Module):
    """x / rms(x) * weight; torch's fused kernel accumulates in float32 like HF's LlamaRMSNorm.

    HF also rounds to the input dtype before the weight multiply; skipping that rounding
    changes bf16 results by an ulp and saves two dtype conversions per norm on the CPU hot path.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    @overload
    def forward(self, x: torch.Tensor, fp8: Literal[False] = False) -> torch.Tensor: ...
    @overload
    def forward(self, x: torch.Tensor, fp8: bool) -> torch.Tensor | Fp8Activation: ...
    def forward(self, x: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activation:
        """norm(x); with fp8 (CUDA) the rows [T, H] quantized to e4m3 in the same kernel, for an FP8 linear."""
        if x.is_cuda and HAS_TRITON:
            from lmserve.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, fp8)
        assert not fp8, "the fused e4m3 output is CUDA's (takes_fp8_activation)"
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    @overload
    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor, fp8: Literal[False] = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor, fp8: bool
    ) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]: ...
    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor, fp8: bool = False
    ) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        """(norm(x + residual), x + residual); on CUDA one fused kernel that updates residual in place (with fp8
        it also quantizes the normed rows to e4m3 for an FP8 linear, see forward).

        On the CPU the residual stream is carried in float32 whatever the model's dtype (as llama.cpp carries its
        activations): each sublayer's 16-bit output is added to it exactly and the norm rounds once to x's dtype
        for the next matmul. A bf16 residual rounds the running sum 2 x 30 times per token; with the embedded
        SmolLM2 that flipped "What is the capital of France?" from float32's "The capital of France is Paris." to
        "L'Etoile, ..." (RESULTS.md, about 3 % of a decode step). A float32 model computes exactly as before.
        With the CPU's C kernels (kernels/cpu_native.py) a bf16 model's add and norm are one call, the float32
        residual updated in place.
        """
        if x.is_cuda and HAS_TRITON:
            from lmserve.kernels.rmsnorm import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps, fp8)
        assert not fp8, "the fused e4m3 output is CUDA's (takes_fp8_activation)"
        if (
            x.dtype == torch.bfloat16
            and self.weight.dtype == torch.bfloat16
            and cpu_native.kernel_available()
        ):
            return cpu_native.add_rms_norm(x, residual, self._float_weight(), self.eps)
        residual = residual.float() + x
        if self.weight.dtype == torch.float32:
            return F.rms_norm(residual, (x.shape[-1],), self.weight, self.eps), residual
        normed = F.rms_norm(residual, (x.shape[-1],), self._float_weight(), self.eps)
        return normed.to(x.dtype), residual

    def _float_weight(self) -> torch.Tensor:
        """The weight in float32 for the float32 residual stream (made once, after the weights are loaded)."""
        key = (self.weight.data_ptr(), self.weight._version)  # a load (copy_) or a swap of the weight: again
        cached = self.__dict__.get("_weight_f32")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_weight_f32"] = (key, self.weight.detach().float())
        return cached[1]


class GemmaRMSNorm(nn.Module):
    """Gemma's norm: x / rms(x) * (1 + weight), all in float32 and rounded once at the end, as HF computes it."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
