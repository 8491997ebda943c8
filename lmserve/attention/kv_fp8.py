"""FP8 KV cache (`--quant-policy fp8`, vLLM's `--kv-cache-dtype fp8`): K and V stored as float8 e4m3, one byte
per element, in the plain cache layout [2, num_blocks, block_size, Hkv, D] with a fixed scale of 1.0.

e4m3 keeps a relative step of 2^-3 over 2^-6..448 (subnormals to 2^-9). Being floating point, a scale would
only move values out of the subnormal or saturated ends, and that does not buy quality: SmolLM2-135M's perplexity
is +0.66 % with a scale of 1.0 and +0.64 % with every K/V scaled by 16 first (its largest |K| is ~20, layer 0's V
are 43 % subnormal); the loss is the 3-bit mantissa. So no scale is stored (vLLM's default too;
benchmarks/quant_quality.md). Values outside +-448 saturate, as the GPU's cvt.rn.satfinite does. On CUDA the Triton
kernels of the plain backend write e4m3 (rotary_store_kv / store_kv cast on store) and widen it to the query's
dtype in registers as they read it; the CPU reference widens the batch's blocks into a compact copy, as the
int8 / int4 reference does.
"""

from __future__ import annotations

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.kv_quant import CompactTorchKVBackend
from lmserve.engine.cpu_memory import lazily_zeroed

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 (nearest even), saturating at +-448 like the GPU's conversion (torch's gives NaN)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def allocate_fp8_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [lazily_zeroed(shape, FP8_KV_DTYPE, device) for _ in range(num_layers)]


def store_fp8_kv_ref(
    k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k/v [T, Hkv, D] into the e4m3 cache at slot_mapping (-1 skipped); through a byte view, since torch's CPU
    index_copy_ / index_put_ have no float8 kernels."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat = layer_cache.view(torch.uint8).view(2, -1, *layer_cache.shape[3:])
    flat[0].index_copy_(0, slots, to_fp8(k[valid]).view(torch.uint8))
    flat[1].index_copy_(0, slots, to_fp8(v[valid]).view(torch.uint8))


class TorchFP8KVBackend(CompactTorchKVBackend):
    """The reference (CPU): store e4m3 through a byte view, widen the step's blocks into a compact copy in the
    model's dtype, attend with the plain TorchAttentionBackend."""

    def allocate_kv_cache(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[torch.Tensor]:
        return allocate_fp8_kv_cache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, device)

    def store(
        self, k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        store_fp8_kv_ref(k, v, layer_cache, slot_mapping)

    def widen_blocks(
        self, layer_cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return layer_cache.view(torch.uint8).index_select(1, block_ids).view(FP8_KV_DTYPE).to(dtype)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        return to_fp8(x).to(x.dtype)


def fp8_kv_backend(device: torch.device) -> AttentionBackend:
    """TritonFP8KVBackend on CUDA when Triton is installed (the plain kernels, which widen e4m3 as they load
    it), else the torch reference."""
    if device.type == "cuda":
        from lmserve.kernels._triton import HAS_TRITON

        if HAS_TRITON:
            from lmserve.attention.triton_backend import TritonFP8KVBackend

            return TritonFP8KVBackend()
    return TorchFP8KVBackend()
