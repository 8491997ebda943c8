"""Quantized KV cache backends (`--quant-policy 8|4`): int8 / int4 codes with per-token, per-head scale and zero.

Both backends store every new K/V quantized and attend over the dequantized cache, the new chunk included,
so the two agree with one reference: quantize, store, dequantize, then the unquantized attention math.
int4 first rotates keys and queries (and values, un-rotating the output) by an orthonormal Hadamard matrix
along head_dim: scores are unchanged, and the outlier key channels that per-token int4 scales cannot follow
are spread over all dims (SmolLM2-135M: +14.1 % perplexity without, +6.2 % with; benchmarks/quant_quality.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmserve.attention.metadata import AttentionMetadata
from lmserve.kernels.hadamard import rotate
from lmserve.kernels.kv_quant import (
    PARAMS_DTYPE,
    dequantize_blocks,
    dequantize_kv_ref,
    packed_dim,
    quantize_kv_ref,
    store_quantized_kv_ref,
)

QUANT_POLICY_BITS = {8: 8, 4: 4}
# (rotate keys and queries, rotate values) by bit width. int8 needs no rotation (+0.03 % perplexity
# without; measured in benchmarks/quant_quality.md) and its decode stays free of the extra matmuls.
ROTATIONS = {8: (False, False), 4: (True, True)}


def rotations_for(bits: int) -> tuple[bool, bool]:
    return ROTATIONS[bits]


@dataclass(frozen=True)
class QuantizedKVCache:
    """One layer's cache: codes uint8 [2, num_blocks, block_size, Hkv, D * bits / 8] (0 = K, 1 = V) and
    params float16 [2, num_blocks, block_size, Hkv, 2] = (scale, zero); x ~= code * scale + zero."""

    codes: torch.Tensor
    params: torch.Tensor
    bits: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole layer as a plain cache [2, num_blocks, block_size, Hkv, D] (tests and debugging); parts
        the backend rotates (int4) come back rotated."""
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
        self.rotate_keys, self.rotate_values = rotations_for(bits)
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
        if self.rotate_keys:
            q, k = rotate(q), rotate(k)
        if self.rotate_values:
            v = rotate(v)
        store_quantized_kv_ref(k, v, layer_cache.codes, layer_cache.params, meta.slot_mapping, bits)
        num_tokens = meta.num_tokens  # padding rows (slot -1) belong to no sequence: leave them out
        block_ids, compact_meta = self.plan(meta, num_tokens)
        compact = dequantize_blocks(layer_cache.codes, layer_cache.params, block_ids, bits, q.dtype)
        # the new K/V as stored: a prompt with nothing cached attends to them directly
        k, v = (dequantize_kv_ref(*quantize_kv_ref(x[:num_tokens], bits), bits, q.dtype) for x in (k, v))
        out = self.inner.forward(q[:num_tokens], k, v, compact, compact_meta, scale)
        if self.rotate_values:
            out = rotate(out)
        if num_tokens == q.shape[0]:
            return out
        return torch.cat([out, out.new_zeros(q.shape[0] - num_tokens, *out.shape[1:])])


class TritonQuantKVBackend(_QuantizedKVAllocation):
    """CUDA: a Triton quantize-and-store, then decode and prefill attention kernels that read the int codes
    through the block tables (no dequantized copy, no host sync: CUDA-graph safe)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.rotate_keys, self.rotate_values = rotations_for(bits)

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
        from lmserve.kernels.kv_quant_prefill import paged_prefill_attention_quant

        if self.rotate_keys:
            q, k = rotate(q), rotate(k)
        if self.rotate_values:
            v = rotate(v)
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
            paged_prefill_attention_quant(
                q, codes, params, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale, self.bits,
                first_seq=num_decodes, num_seqs=meta.num_seqs - num_decodes,
                max_query_len=meta.max_query_len, out=out,
            )  # fmt: skip
        return rotate(out) if self.rotate_values else out


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
