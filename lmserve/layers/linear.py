"""Linear layers: the plain one, and make_linear, which dispatches to quantized linears."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b with uninitialized weights (load_weights fills them; init would waste seconds)."""

    output_dims: dict[str, int] = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def make_linear(
    in_features: int, out_features: int, bias: bool, quant_config: dict[str, Any] | None
) -> nn.Module:
    """A linear layer; quantized (lmserve.quant.linear) when quant_config is set.

    Every returned module exposes `output_dims`: param name -> the dim holding output features,
    so fused projections (qkv, gate_up) can be concatenated shard by shard at load time.
    Dtype and device come from torch's defaults (the model builds under them).
    """
    if quant_config is None:
        return Linear(in_features, out_features, bias)
    from lmserve.quant.linear import make_quantized_linear

    return make_quantized_linear(in_features, out_features, bias, quant_config)


def output_dims_of(module: nn.Module) -> dict[str, int]:
    """The `output_dims` map of a linear built by make_linear."""
    dims = getattr(module, "output_dims", None)
    if not isinstance(dims, dict):
        raise TypeError(f"{type(module).__name__} lacks output_dims, so its shards cannot be fused")
    return dims
