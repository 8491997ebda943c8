"""Activations over fused projections."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmserve.kernels import cpu_native
from lmserve.kernels._triton import HAS_TRITON
from lmserve.kernels.fp8 import Fp8Activation


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    if gate_up.is_cuda and HAS_TRITON:
        from lmserve.kernels.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(gate_up)
    if gate_up.dim() == 2 and gate_up.dtype == torch.bfloat16:
        out = cpu_native.silu_and_mul(gate_up)  # the C kernel where it runs (kernels/cpu_native.py)
        if out is not None:
            return out
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up (GeGLU, HF's `gelu_pytorch_tanh`) for gate_up = [gate | up] along the last dim."""
    half = gate_up.shape[-1] // 2
    return F.gelu(gate_up[..., :half], approximate="tanh") * gate_up[..., half:]


_GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
}


def silu_and_mul_fp8(gate_up: torch.Tensor) -> Fp8Activation:
    """silu_and_mul's rows [T, I] quantized per token to e4m3 in the same kernel (CUDA), for an FP8 linear."""
    from lmserve.kernels.activation import silu_and_mul_fp8 as triton_silu_and_mul_fp8

    return triton_silu_and_mul_fp8(gate_up)


_FP8_GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], Fp8Activation]] = {"silu": silu_and_mul_fp8}


def fp8_gated_activation(hidden_act: str) -> Callable[[torch.Tensor], Fp8Activation] | None:
    """The gated activation that also quantizes its output to e4m3 (None where there is no such kernel)."""
    return _FP8_GATED_ACTIVATIONS.get(hidden_act)


def gated_activation(hidden_act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """act(gate) * up over a fused [gate | up] projection, for an HF hidden_act name."""
    if hidden_act not in _GATED_ACTIVATIONS:
        raise ValueError(
            f"hidden_act={hidden_act!r} is not supported; supported: {tuple(_GATED_ACTIVATIONS)}"
        )
    return _GATED_ACTIVATIONS[hidden_act]
