"""Quantized KV cache backends (`--quant-policy 8|4`): int8 / int4 codes with per-token, per-head scale and zero.

Both backends store every new K/V quantized and attend over the dequantized cache, the new chunk included,
so the two agree with one reference: quantize, store, dequantize, then the unquantized attention math.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmserve.attention.metadata import AttentionMetadata
from lmserve.kernels.kv_quant import (
    PARAMS_DTYPE,
    dequantize_blocks,
    dequantize_kv_ref,
    packed_dim,
    quantize_kv_ref,
    store_quantized_kv_ref,
)

QUANT_POLICY_BITS = {8: 8, 4: 4}


@dataclass(frozen=True)
class QuantizedKVCache:
    """One layer's cache: codes uint8 [2, num_blocks, block_size, Hkv, D * bits / 8] (0 = K, 1 = V) and
    params float16 [2, num_blocks, block_size, Hkv, 2] = (scale, zero); x ~= code * scale + zero."""

    codes: torch.Tensor
    params: torch.Tensor
    bits: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole layer as a plain cache [2, num_blocks, block_size, Hkv, D] (tests and debugging)."""
        return dequantize_kv_ref(self.codes, self.params, self.bits, dtype)


def bits_of(quant_policy: int) -> int:
    if quant_policy not in QUANT_POLICY_BITS:
        raise ValueError(
            f"{quant_policy=} must be one of {sorted(QUANT_POLICY_BITS)} for a quantized KV cache"
        )
    return QUANT_POLICY_BITS[quant_policy]


def allocate_quantized_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    bits: int,
    device: torch.device,
) -> list[QuantizedKVCache]:
    codes_shape = (2, num_blocks, block_size, num_kv_heads, packed_dim(head_dim, bits))
    params_shape = (2, num_blocks, block_size, num_kv_heads, 2)
    return [
        QuantizedKVCache(
            torch.zeros(codes_shape, dtype=torch.uint8, device=device),
            torch.zeros(params_shape, dtype=PARAMS_DTYPE, device=device),
            bits,
        )
        for _ in range(num_layers)
    ]


def quantized_bytes_per_element(head_dim: int, bits: int) -> float:
    """Cache bytes per K or V element, the per-token (scale, zero) pair included."""
    return (packed_dim(head_dim, bits) + 2 * PARAMS_DTYPE.itemsize) / head_dim


def compact_block_tables(num_seqs: int, max_blocks: int, device: torch.device) -> torch.Tensor:
    """Sequence i owns blocks i * max_blocks .. of a compact, dequantized copy of its context."""
    return torch.arange(num_seqs * max_blocks, dtype=torch.int32, device=device).view(num_seqs, max_blocks)


def compact_slot_mapping(meta: AttentionMetadata, max_blocks: int, num_rows: int) -> torch.Tensor:
    """Slots of the new tokens in the compact copy (sequence i at i * max_blocks * block_size + position)."""
    query_lens = torch.tensor(meta.query_lens_cpu)
    seq_ids = torch.repeat_interleave(torch.arange(meta.num_seqs), query_lens)
    first_position = torch.tensor(meta.seq_lens_cpu) - query_lens
    first_row = torch.cumsum(query_lens, 0) - query_lens
    rows = torch.arange(len(seq_ids))
    slots = seq_ids * max_blocks * meta.block_size + first_position[seq_ids] + rows - first_row[seq_ids]
    padding = torch.full((num_rows - len(slots),), -1, dtype=torch.int64)
    return torch.cat([slots, padding]).to(meta.slot_mapping.device)


class _QuantizedKVAllocation:
    """What both quantized-KV backends share: the bit width and the cache layout."""

    bits: int

    def allocate_kv_cache(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[QuantizedKVCache]:
        return allocate_quantized_kv_cache(
            num_layers, num_blocks, block_size, num_kv_heads, head_dim, self.bits, device
        )


class TorchQuantKVBackend(_QuantizedKVAllocation):
    """The reference (CPU): quantize-and-store in torch, dequantize the batch's blocks into a compact plain
    cache, then run the unquantized TorchAttentionBackend on that copy."""

    def __init__(self, bits: int) -> None:
        from lmserve.attention.torch_backend import TorchAttentionBackend

        self.bits = bits
        self.inner = TorchAttentionBackend()
        # every layer of a step shares one metadata: build its compact layout once per step
        self._planned_for: torch.Tensor | None = None
        self._plan: tuple[torch.Tensor, AttentionMetadata] | None = None

    def plan(self, meta: AttentionMetadata, num_rows: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """(block ids to dequantize, metadata over the compact copy) for this step."""
        if meta.slot_mapping is not self._planned_for or self._plan is None:
            max_blocks = -(-max(meta.seq_lens_cpu) // meta.block_size)
            block_ids = meta.block_tables[:, :max_blocks].reshape(-1)
            compact_meta = dataclasses.replace(
                meta,
                slot_mapping=compact_slot_mapping(meta, max_blocks, num_rows),
                block_tables=compact_block_tables(meta.num_seqs, max_blocks, meta.block_tables.device),
            )
            self._plan, self._planned_for = (block_ids, compact_meta), meta.slot_mapping
        return self._plan

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: QuantizedKVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        bits = self.bits
        store_quantized_kv_ref(k, v, layer_cache.codes, layer_cache.params, meta.slot_mapping, bits)
        num_tokens = meta.num_tokens  # padding rows (slot -1) belong to no sequence: leave them out
        block_ids, compact_meta = self.plan(meta, num_tokens)
        compact = dequantize_blocks(layer_cache.codes, layer_cache.params, block_ids, bits, q.dtype)
        # the new K/V as stored: a prompt with nothing cached attends to them directly
        k, v = (dequantize_kv_ref(*quantize_kv_ref(x[:num_tokens], bits), bits, q.dtype) for x in (k, v))
        out = self.inner.forward(q[:num_tokens], k, v, compact, compact_meta, scale)
        if num_tokens == q.shape[0]:
            return out
        return torch.cat([out, out.new_zeros(q.shape[0] - num_tokens, *out.shape[1:])])


class TritonQuantKVBackend(_QuantizedKVAllocation):
    """CUDA: a Triton quantize-and-store, decode attention that dequantizes in registers (no host sync,
    CUDA-graph safe), and for prefill chunks the needed blocks dequantized, then the plain prefill kernel."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: QuantizedKVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        from lmserve.kernels.kv_quant import paged_decode_attention_quant, store_quantized_kv

        codes, params = layer_cache.codes, layer_cache.params
        store_quantized_kv(k, v, codes, params, meta.slot_mapping, self.bits)
        out = torch.empty_like(q)
        num_decodes = meta.num_decodes
        if num_decodes:
            paged_decode_attention_quant(
                q[:num_decodes], codes, params, meta.block_tables, meta.seq_lens, scale, self.bits,
                out=out[:num_decodes],
            )  # fmt: skip
        if num_decodes < meta.num_seqs:
            self.prefill(q, layer_cache, meta, scale, out)
        return out

    def prefill(
        self,
        q: torch.Tensor,
        layer_cache: QuantizedKVCache,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        from lmserve.kernels.prefill_attention import paged_prefill_attention

        first, num_prefills = meta.num_decodes, meta.num_seqs - meta.num_decodes
        max_blocks = -(-max(meta.seq_lens_cpu[first:]) // meta.block_size)
        block_ids = meta.block_tables[first:, :max_blocks].reshape(-1)
        compact = dequantize_blocks(layer_cache.codes, layer_cache.params, block_ids, self.bits, q.dtype)
        tables = torch.zeros(meta.num_seqs, max_blocks, dtype=torch.int32, device=q.device)
        tables[first:] = compact_block_tables(num_prefills, max_blocks, q.device)
        paged_prefill_attention(
            q, compact[0], compact[1], tables, meta.seq_lens, meta.query_start_loc, scale,
            first_seq=first, num_seqs=num_prefills, max_query_len=meta.max_query_len, out=out,
        )  # fmt: skip


def quantized_kv_backend(
    device: torch.device, quant_policy: int
) -> TorchQuantKVBackend | TritonQuantKVBackend:
    """The Triton backend on CUDA when Triton is installed, else the torch reference."""
    bits = bits_of(quant_policy)
    if device.type == "cuda":
        from lmserve.kernels._triton import HAS_TRITON

        if HAS_TRITON:
            return TritonQuantKVBackend(bits)
    return TorchQuantKVBackend(bits)
