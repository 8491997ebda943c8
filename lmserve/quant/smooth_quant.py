"""SmoothQuant: migrate activation outliers into weights (strength alpha), then int8 weights per channel.

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X diag(s)^-1 folds into the previous RMSNorm (or linear),
diag(s) W into the linears. At run time activations are quantized to int8 per token (W8A8Linear).
"""

from __future__ import annotations

from typing import Any

import torch

from lmserve.kernels.int8_gemm import quantize_rows_int8
from lmserve.quant.awq import apply_scales

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def smoothing_pairs(layer: Any) -> list[tuple[Any, list[str], str]]:
    """(previous op, linears reading its output, the linear whose input stats apply) for a Llama layer."""
    attn = layer.self_attn
    pairs: list[tuple[Any, list[str], str]] = [
        (
            layer.input_layernorm,
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "self_attn.q_proj",
        ),
        (layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_proj"),
        (layer.mlp.up_proj, ["mlp.down_proj"], "mlp.down_proj"),
    ]
    if attn.v_proj.out_features == attn.o_proj.in_features:  # not with grouped-query attention
        pairs.append((attn.v_proj, ["self_attn.o_proj"], "self_attn.o_proj"))
    return pairs


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per input channel s = act^alpha / w^(1 - alpha), with w the max |weight| over all linears."""
    weight_absmax = torch.cat([w.float() for w in weights]).abs().amax(dim=0)
    scales = act_absmax.float().clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


@torch.no_grad()
def smooth_layer(layer: Any, prefix: str, act_absmax: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold SmoothQuant scales into one decoder layer, using absmax stats keyed by full module name."""
    for prev_op, linear_names, stats_name in smoothing_pairs(layer):
        linears = [layer.get_submodule(name) for name in linear_names]
        key = f"{prefix}.{stats_name}"
        if key not in act_absmax:
            raise ValueError(f"calibration statistics lack {key!r}: recalibrate this model")
        scales = smooth_scales(act_absmax[key], [linear.weight for linear in linears], alpha)
        apply_scales(prev_op, linears, scales)


def int8_tensors(layer: Any, prefix: str) -> dict[str, torch.Tensor]:
    """compressed-tensors names: `<linear>.weight` int8 [out, in], `<linear>.weight_scale` float32 [out, 1]."""
    tensors: dict[str, torch.Tensor] = {}
    for name in LINEAR_NAMES:
        linear = layer.get_submodule(name)
        q, scale = quantize_rows_int8(linear.weight)
        tensors[f"{prefix}.{name}.weight"] = q
        tensors[f"{prefix}.{name}.weight_scale"] = scale
        if linear.bias is not None:
            tensors[f"{prefix}.{name}.bias"] = linear.bias.detach().clone()
    return tensors
