"""oneDNN's prepacked GEMM for the CPU linears: the same product as F.linear, 1.1-1.8x faster on this project's CPU.

`F.linear` on a CPU tensor hands the plain [N, K] weight to MKL at every call. oneDNN can instead reorder the
weight once, at load time, into the blocked layout its AVX512 micro-kernels read (`torch.ops.mkldnn.
_reorder_linear_weight`, what inductor's CPU freezing pass uses). Measured on the 2-core AVX512-BF16 EPYC,
SmolLM2-135M shapes, bf16 (`benchmarks/cpu_kernels.py`; benchmarks/RESULTS.md, "CPU GEMMs"): 1.3-1.8x F.linear
at 8-32 rows (the decode batches of a busy server), 1.0-1.1x at 128-256 (prefill). At 1-3 rows torch's int4 and
int8 weight-only kernels, which read 4x / 2x fewer bytes, stay faster, so they keep those rows.

The packed copy sits beside the dense weight (the embedding, the weight cache, LoRA's fused shrink and tp read
the dense one): the linears' weights are held twice. A model whose weights would not fit twice in a quarter of
the available memory is left unpacked.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

ONEDNN_ENV = "LMSERVE_CPU_ONEDNN"
"""Set to 0 to keep every CPU linear on F.linear (for comparisons)."""
PACK_BATCH_HINT = 16
"""The row count oneDNN picks the packed layout for; any row count runs on it (measured: 1, 16 or 128 give the
same speed within noise from 4 to 256 rows)."""
PACKED_DTYPES = (torch.bfloat16, torch.float32)


def onednn_available() -> bool:
    """Whether this torch has oneDNN's packed linear and the user has not turned it off."""
    if os.environ.get(ONEDNN_ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> oneDNN's blocked copy (an opaque mkldnn tensor) for packed_linear."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T + bias, W given as pack_weight(W); x of any row count (zero included) and strides."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and weight.dim() == 2


def pack_cpu_linears(model: nn.Module, available_bytes: int | None) -> int:
    """Give every CPU Linear of `model` (and its lm_head, through `pack_lm_head`) a packed copy; returns the count.

    Call it once the weights are final (after loading or a weight-cache restore). Skipped, with a log line,
    when oneDNN is unavailable or the copies would take more than a quarter of `available_bytes`.
    """
    from lmserve.layers.linear import Linear

    if not onednn_available():
        return 0
    # idempotent: the engine packs beside the tokenizer load, then build_runner calls it again (a no-op)
    linears = [
        m for m in model.modules() if isinstance(m, Linear) and packable(m.weight) and m.onednn is None
    ]
    extra = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if available_bytes is not None and 4 * extra > available_bytes:
        logger.info("CPU linears stay on F.linear: their packed copies (%.1f GB) would not fit", extra / 1e9)
        return 0
    for module in linears:
        module.onednn = pack_weight(module.weight)
    pack_lm_head = getattr(model, "pack_lm_head", None)
    if pack_lm_head is not None:
        pack_lm_head()
    return len(linears)
