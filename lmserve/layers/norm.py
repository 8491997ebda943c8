"""RMSNorm (Llama's x * w) and Gemma's (1 + w) variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels._triton import HAS_TRITON


class RMSNorm(nn.Module):
    """x / rms(x) * weight; torch's fused kernel accumulates in float32 like HF's LlamaRMSNorm.

    HF also rounds to the input dtype before the weight multiply; skipping that rounding
    changes bf16 results by an ulp and saves two dtype conversions per norm on the CPU hot path.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and HAS_TRITON:
            from lmserve.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); on CUDA one fused kernel that updates residual in place."""
        if x.is_cuda and HAS_TRITON:
            from lmserve.kernels.rmsnorm import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        residual = x + residual
        return self.forward(residual), residual


class GemmaRMSNorm(nn.Module):
    """Gemma's norm: x / rms(x) * (1 + weight), all in float32 and rounded once at the end, as HF computes it."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
