"""AttentionBackend: the protocol every paged-attention implementation follows, and how one is picked."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lmserve.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Attention over a paged KV cache for a flat, ragged batch (decodes first, then prefill chunks)."""

    def allocate_kv_cache(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[Any]:
        """One cache object per layer."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: Any,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D].

        Writes the new k/v at meta.slot_mapping (slots of -1 are skipped), then each sequence's
        new queries attend causally to all its tokens (cached and new) through meta.block_tables.
        """
        ...


def get_attention_backend(device: torch.device, quant_policy: int = 0) -> AttentionBackend:
    """The Triton backend on CUDA when it is installed, else the plain-torch reference.

    quant_policy 8 / 4 (LMDeploy's flag) gives the int8 / int4 KV cache variant of the same choice.
    """
    if quant_policy:
        from lmserve.attention.kv_quant import quantized_kv_backend

        return quantized_kv_backend(device, quant_policy)
    if device.type == "cuda":
        try:
            from lmserve.attention.triton_backend import TritonAttentionBackend
        except ImportError:
            pass
        else:
            return TritonAttentionBackend()
    from lmserve.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
