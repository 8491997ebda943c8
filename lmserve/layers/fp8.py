"""FP8 W8A8 linear (`--model-format fp8`): e4m3 weights per output channel, activations per token at run time.

Three ways in, one layout at run time (e4m3 weight [N, K] + float32 weight_scale [N, 1]):
- `dynamic`: a float checkpoint (HF folder or GGUF) quantized at load time (prepare_for_inference);
- `channel`: compressed-tensors `float-quantized` checkpoints (llm-compressor's FP8_DYNAMIC: `weight_scale` [N, 1]);
- `block`: HF `quant_method: fp8` checkpoints with `weight_block_size` (`weight_scale_inv` per 128 x 128 block),
  re-rounded per channel at load, since torch._scaled_mm takes no block scales.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmserve.kernels.fp8 import (
    FP8,
    Fp8Activation,
    fp8_linear,
    quantize_rows_fp8,
    requantize_blocks_per_channel,
    takes_fp8_activation,
)

FP8_LAYOUTS = ("dynamic", "channel", "block")
QUANTIZE_AT_LOAD = {"quant_method": "fp8", "activation_scheme": "dynamic", "lmserve_layout": "dynamic"}
"""The quantization_config `--model-format fp8` gives a float checkpoint: quantize every linear at load time."""


def fp8_layout(quantization_config: dict[str, Any]) -> tuple[str, tuple[int, int] | None]:
    """(layout, block shape) of an FP8 quantization_config; ValueError for FP8 variants we do not run."""
    if quantization_config.get("lmserve_layout") == "dynamic":
        return "dynamic", None
    if quantization_config.get("quant_method") == "compressed-tensors":
        return "channel", None
    if quantization_config.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("FP8 checkpoints with static activation scales are not supported; use a dynamic one")
    block = quantization_config.get("weight_block_size")
    if not block:
        raise ValueError(
            "FP8 checkpoints with one scale per tensor are not supported; supported: block scales "
            "(weight_block_size) and compressed-tensors channel-wise FP8, or --model-format fp8 on a float checkpoint"
        )
    return "block", (int(block[0]), int(block[1]))


class Fp8Linear(nn.Module):
    """y = fp8(x per token) @ fp8(W per channel)^T with both scales (and the bias) applied in the GEMM."""

    output_dims = {"weight": 0, "weight_scale": 0, "weight_scale_inv": 0, "bias": 0}
    input_dims = {"weight": 1, "weight_scale_inv": 1}  # per-channel scales stay whole on a row-parallel rank

    def __init__(
        self, in_features: int, out_features: int, bias: bool, layout: str, block: tuple[int, int] | None
    ) -> None:
        super().__init__()
        if layout not in FP8_LAYOUTS:
            raise ValueError(f"FP8 layout {layout!r} must be one of {FP8_LAYOUTS}")
        self.in_features, self.out_features, self.layout, self.block = (
            in_features,
            out_features,
            layout,
            block,
        )
        weight_dtype = torch.get_default_dtype() if layout == "dynamic" else FP8
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=weight_dtype))
        if layout == "block":
            assert block is not None
            grid = (-(-out_features // block[0]), -(-in_features // block[1]))
            self.weight_scale_inv = _frozen(torch.empty(grid, dtype=torch.float32))
        elif layout == "channel":
            self.weight_scale = _frozen(torch.empty(out_features, 1, dtype=torch.float32))
        self.bias = _frozen(torch.empty(out_features)) if bias else None

    def prepare_for_inference(self) -> None:
        """Bring every layout to e4m3 per channel (quantize a float weight; re-round block scales)."""
        if self.layout == "dynamic":
            weight, scale = quantize_rows_fp8(self.weight.data)
        elif self.layout == "block":
            assert self.block is not None
            weight, scale = requantize_blocks_per_channel(
                self.weight.data, self.weight_scale_inv.data, self.block
            )
            del self.weight_scale_inv
        else:
            return
        self.weight = _frozen(weight)
        self.weight_scale = _frozen(scale)
        self.layout = "channel"

    def takes_fp8_activation(self, num_rows: int) -> bool:
        """Whether num_rows input rows are quantized per token here, so the kernel that makes them (a norm,
        SiLU-and-mul) may hand them over already quantized (an Fp8Activation) and save a launch and a pass."""
        return self.layout == "channel" and takes_fp8_activation(
            num_rows, self.in_features, self.out_features, self.weight.device
        )

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        if isinstance(x, Fp8Activation):
            return fp8_linear(x, self.weight, self.weight_scale, self.bias)
        flat = x.reshape(-1, self.in_features)
        out = fp8_linear(flat, self.weight, self.weight_scale, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def wants_fp8_activation(linear: nn.Module, num_rows: int) -> bool:
    """Whether linear is an Fp8Linear that takes num_rows rows as an Fp8Activation (any other module: no; a
    LoRA-wrapped one too, since its update needs the 16-bit input)."""
    return isinstance(linear, Fp8Linear) and linear.takes_fp8_activation(num_rows)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)
