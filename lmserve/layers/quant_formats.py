"""Checkpoint layouts the runtime reads: AutoAWQ GEMM int4 and compressed-tensors W8A8 int8.

AWQ "GEMM" (AutoAWQ, vLLM, SGLang, LMDeploy read it), per linear of nn.Linear shape [out, in]:
  qweight int32 [in, out / 8]        eight 4-bit values per int32, nibble i holds column
                                     8 * j + AWQ_ORDER[i] of the [in, out] integer weight
  qzeros  int32 [in / group, out / 8] zero points, packed the same way
  scales  fp16  [in / group, out]
  w[in, out] = (q - zeros[group]) * scales[group]
  (the bit packing itself: lmserve/kernels/awq_dequant.py, pack_awq / unpack_awq)

compressed-tensors W8A8 int8 (vLLM, SGLang), per linear:
  weight       int8 [out, in]   symmetric, per output channel
  weight_scale      [out, 1]    activations are quantized per token at run time (dynamic)
"""

from __future__ import annotations

import torch

from lmserve.kernels.awq_dequant import unpack_awq


def check_group_size(in_features: int, group_size: int, name: str = "linear") -> None:
    """Groups run along the input features, so the group size must divide them exactly."""
    if group_size <= 0 or in_features % group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"w_group_size={group_size} does not divide {name}'s in_features={in_features}; "
            f"use one of {divisors or 'a divisor of in_features'}"
        )


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Float [in, out] weight (x @ w) from the AutoAWQ GEMM tensors."""
    q = unpack_awq(qweight)
    zeros = unpack_awq(qzeros).repeat_interleave(group_size, dim=0)
    expanded_scales = scales.repeat_interleave(group_size, dim=0)
    return (q - zeros).to(scales.dtype) * expanded_scales


def awq_quantization_config(w_bits: int, group_size: int) -> dict:
    """config.json `quantization_config` for AutoAWQ GEMM checkpoints.

    zero_point is always true: symmetric mode stores its fixed zero (8) in qzeros, so one
    layout (and every GEMM kernel) serves both.
    """
    return {
        "quant_method": "awq",
        "bits": w_bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }


def w8a8_quantization_config(ignore: list[str]) -> dict:
    """config.json `quantization_config` for compressed-tensors int8 W8A8 (dynamic per-token)."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    weights |= {
        "group_size": None,
        "block_structure": None,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    activations |= {
        "group_size": None,
        "block_structure": None,
        "actorder": None,
        "observer": None,
        "observer_kwargs": {},
    }
    group = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": activations,
        "output_activations": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def quant_method(quantization_config: dict | None) -> str | None:
    """'awq', 'w8a8', 'fp8' or None; ValueError for layouts we do not run."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "fp8":
        return "fp8"
    if method == "awq":
        if (
            quantization_config.get("bits", 4) != 4
            or quantization_config.get("version", "gemm").lower() != "gemm"
        ):
            raise ValueError(f"unsupported AWQ checkpoint {quantization_config}: only bits=4, version=gemm")
        return "awq"
    if method == "compressed-tensors" and compressed_tensors_scheme(quantization_config, "int"):
        return "w8a8"
    if method == "compressed-tensors" and compressed_tensors_scheme(quantization_config, "float"):
        return "fp8"
    raise ValueError(
        f"unsupported quantization_config quant_method={method!r}; supported: awq (gemm), compressed-tensors int8 W8A8, fp8 (block scales), compressed-tensors FP8 (channel)"
    )


def compressed_tensors_scheme(quantization_config: dict, weight_type: str) -> bool:
    """compressed-tensors with one config group: 8-bit `weight_type` weights per channel, activations 8-bit
    per token at run time (dynamic) — the W8A8 schemes we run (int: SmoothQuant; float: FP8_DYNAMIC)."""
    groups = list(quantization_config.get("config_groups", {}).values())
    if len(groups) != 1:
        return False
    weights, activations = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    return (
        weights.get("num_bits") == 8
        and weights.get("type") == weight_type
        and weights.get("strategy") == "channel"
        and activations.get("num_bits") == 8
        and activations.get("dynamic") is True
    )
