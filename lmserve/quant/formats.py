"""Checkpoint layouts: AutoAWQ GEMM int4 packing and the compressed-tensors W8A8 int8 layout.

AWQ "GEMM" (AutoAWQ, vLLM, SGLang, LMDeploy read it), per linear of nn.Linear shape [out, in]:
  qweight int32 [in, out / 8]        eight 4-bit values per int32, nibble i holds column
                                     8 * j + AWQ_ORDER[i] of the [in, out] integer weight
  qzeros  int32 [in / group, out / 8] zero points, packed the same way
  scales  fp16  [in / group, out]
  w[in, out] = (q - zeros[group]) * scales[group]

compressed-tensors W8A8 int8 (vLLM, SGLang), per linear:
  weight       int8 [out, in]   symmetric, per output channel
  weight_scale      [out, 1]    activations are quantized per token at run time (dynamic)
"""

from __future__ import annotations

import torch

from lmserve.quant.rtn import GroupQuantized

PACK_NUM = 8  # 4-bit values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of each packed int32 holds column AWQ_ORDER[i] of its block of eight."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Column c of a block of eight sits in nibble AWQ_REVERSE_ORDER[c]."""
_SHIFTS = torch.arange(PACK_NUM, dtype=torch.int64) * 4


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Pack int4 values [rows, cols] (0..15) into int32 [rows, cols / 8] in AutoAWQ's order."""
    rows, cols = values.shape
    if cols % PACK_NUM:
        raise ValueError(f"cannot pack {cols} columns: must be a multiple of {PACK_NUM}")
    if values.min() < 0 or values.max() > 15:
        raise ValueError("int4 values must lie in 0..15")
    blocks = values.to(torch.int64).reshape(rows, cols // PACK_NUM, PACK_NUM)[..., list(AWQ_ORDER)]
    packed = (blocks << _SHIFTS).sum(dim=-1)
    # Wrap to two's complement: nibble 7 reaches bit 31.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq: int32 [rows, cols / 8] -> int32 [rows, cols] in 0..15."""
    rows, packed_cols = packed.shape
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(rows, packed_cols * PACK_NUM).to(torch.int32)


def awq_tensors(quantized: GroupQuantized) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales for one linear, from nn.Linear-shaped [out, in] integers."""
    return {
        "qweight": pack_awq(quantized.q.t().contiguous()),
        "qzeros": pack_awq(quantized.zeros.t().contiguous()),
        "scales": quantized.scales.t().contiguous().to(torch.float16),
    }


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
    """'awq', 'w8a8' or None; ValueError for layouts we do not run."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "awq":
        if (
            quantization_config.get("bits", 4) != 4
            or quantization_config.get("version", "gemm").lower() != "gemm"
        ):
            raise ValueError(f"unsupported AWQ checkpoint {quantization_config}: only bits=4, version=gemm")
        return "awq"
    if method == "compressed-tensors" and _is_int8_w8a8(quantization_config):
        return "w8a8"
    raise ValueError(
        f"unsupported quantization_config quant_method={method!r}; supported: awq (gemm), compressed-tensors int8 W8A8"
    )


def _is_int8_w8a8(quantization_config: dict) -> bool:
    groups = list(quantization_config.get("config_groups", {}).values())
    if len(groups) != 1:
        return False
    weights, activations = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    return (
        weights.get("num_bits") == 8
        and weights.get("type") == "int"
        and weights.get("strategy") == "channel"
        and activations.get("num_bits") == 8
        and activations.get("dynamic") is True
    )
