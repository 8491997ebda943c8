"""Quantized KV cache backends (`--quant-policy 8|4`): int8 / int4 codes with per-token, per-head scale and zero.

Both backends store every new K/V quantized and attend over the dequantized cache, the new chunk included,
so the two agree with one reference: quantize, store, dequantize, then the unquantized attention math.
int4 first rotates keys and queries (and values, un-rotating the output) by an orthonormal Hadamard matrix
along head_dim: scores are unchanged, and the outlier key channels that per-token int4 scales cannot follow
are spread over all dims (SmolLM2-135M: +14.1 % perplexity without, +6.2 % with; benchmarks/quant_quality.md).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.metadata import AttentionMetadata
from lmserve.attention.torch_backend import TorchAttentionBackend, TorchPlan
from lmserve.engine.cpu_memory import lazily_zeroed
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


def bits_of(quant_policy: int | str) -> int:
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
            lazily_zeroed(codes_shape, torch.uint8, device),
            lazily_zeroed(params_shape, PARAMS_DTYPE, device),
            bits,
        )
        for _ in range(num_layers)
    ]


def quantized_bytes_per_element(head_dim: int, bits: int) -> float:
    """Cache bytes per K or V element, the per-token (scale, zero) pair included."""
    return (packed_dim(head_dim, bits) + 2 * PARAMS_DTYPE.itemsize) / head_dim


def kv_bytes_per_element(quant_policy: int | str, head_dim: int, dtype: torch.dtype) -> float:
    """Cache bytes per K or V element under a quant_policy: the model dtype's size (0), one byte (fp8, no
    scales), or the int codes with their per-token (scale, zero)."""
    if quant_policy == "fp8":
        return 1.0
    if quant_policy:
        return quantized_bytes_per_element(head_dim, bits_of(quant_policy))
    return float(torch.empty((), dtype=dtype).element_size())


def compact_block_tables(num_seqs: int, max_blocks: int, device: torch.device) -> torch.Tensor:
    """Sequence i owns blocks i * max_blocks .. of a compact, dequantized copy of its context."""
    return torch.arange(num_seqs * max_blocks, dtype=torch.int32, device=device).view(num_seqs, max_blocks)


def compact_slot_mapping(
    query_lens: list[int], seq_lens: list[int], max_blocks: int, block_size: int
) -> torch.Tensor:
    """Slots of the new tokens in the compact copy (sequence i at i * max_blocks * block_size + position)."""
    new_counts = torch.tensor(query_lens)
    seq_ids = torch.repeat_interleave(torch.arange(len(query_lens)), new_counts)
    first_position = torch.tensor(seq_lens) - new_counts
    first_row = torch.cumsum(new_counts, 0) - new_counts
    rows = torch.arange(len(seq_ids))
    return seq_ids * max_blocks * block_size + first_position[seq_ids] + rows - first_row[seq_ids]


class _QuantizedKVAllocation(AttentionBackend):
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


@dataclass(frozen=True)
class CompactPlan:
    """A step of the torch reference: where the new K/V go, the blocks to dequantize, and the plain plan over
    their compact copy (which covers the first num_tokens rows: padding rows belong to no sequence)."""

    slot_mapping: torch.Tensor
    block_ids: torch.Tensor
    compact: TorchPlan
    num_tokens: int


class CompactTorchKVBackend(AttentionBackend):
    """The CPU reference of a KV cache stored in a narrow format: store the new K/V in it, widen the batch's
    blocks into a compact plain cache, then run the unquantized TorchAttentionBackend on that copy.

    Subclasses say how the format stores (`store`), widens blocks (`widen_blocks`) and what a new K/V reads as
    once stored (`as_stored`: a prompt with nothing cached attends to its new K/V directly).
    """

    supports_sliding_window = True
    rotate_keys = rotate_values = False

    def __init__(self) -> None:
        self.inner = TorchAttentionBackend()

    @abstractmethod
    def store(self, k: torch.Tensor, v: torch.Tensor, layer_cache: Any, slot_mapping: torch.Tensor) -> None:
        """Write k/v [T, Hkv, D] at slot_mapping (-1 skipped)."""

    @abstractmethod
    def widen_blocks(self, layer_cache: Any, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The given blocks as a plain cache [2, n, block_size, Hkv, D] in dtype."""

    @abstractmethod
    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, Hkv, D] as it reads back from the cache, in x's dtype."""

    def prepare(self, meta: AttentionMetadata) -> CompactPlan:
        """The compact layout every layer of the step shares, built once per step."""
        query_lens, seq_lens = meta.host_lens()
        max_blocks = -(-max(seq_lens) // meta.block_size)
        device = meta.block_tables.device
        compact_meta = dataclasses.replace(
            meta,
            slot_mapping=compact_slot_mapping(query_lens, seq_lens, max_blocks, meta.block_size).to(device),
            block_tables=compact_block_tables(meta.num_seqs, max_blocks, device),
        )
        # every row of the compact slot mapping is a real token: no padding to look for
        compact = TorchPlan(compact_meta, query_lens, seq_lens, kept_rows=None)
        block_ids = meta.block_tables[:, :max_blocks].reshape(-1)
        return CompactPlan(meta.slot_mapping, block_ids, compact, meta.num_tokens)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: Any,
        plan: CompactPlan,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        num_tokens = plan.num_tokens
        if self.rotate_keys:
            q, k = rotate(q), rotate(k)
        if self.rotate_values:
            v = rotate(v)
        self.store(k, v, layer_cache, plan.slot_mapping)
        compact = self.widen_blocks(layer_cache, plan.block_ids.long(), q.dtype)
        k, v = self.as_stored(k[:num_tokens]), self.as_stored(v[:num_tokens])
        out = self.inner.forward(q[:num_tokens], k, v, compact, plan.compact, scale, sliding_window)
        if self.rotate_values:
            out = rotate(out)
        if num_tokens == q.shape[0]:
            return out
        return torch.cat([out, out.new_zeros(q.shape[0] - num_tokens, *out.shape[1:])])


class TorchQuantKVBackend(_QuantizedKVAllocation, CompactTorchKVBackend):
    """The int8 / int4 reference (CPU): quantize-and-store in torch, dequantize the batch's blocks."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.rotate_keys, self.rotate_values = rotations_for(bits)

    def store(
        self, k: torch.Tensor, v: torch.Tensor, layer_cache: QuantizedKVCache, slot_mapping: torch.Tensor
    ) -> None:
        store_quantized_kv_ref(k, v, layer_cache.codes, layer_cache.params, slot_mapping, self.bits)

    def widen_blocks(
        self, layer_cache: QuantizedKVCache, block_ids: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return dequantize_blocks(layer_cache.codes, layer_cache.params, block_ids, self.bits, dtype)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_kv_ref(*quantize_kv_ref(x, self.bits), self.bits, x.dtype)


class TritonQuantKVBackend(_QuantizedKVAllocation):
    """CUDA: a Triton quantize-and-store, then decode and prefill attention kernels that read the int codes
    through the block tables (no dequantized copy, no host sync: CUDA-graph safe)."""

    supports_cuda_graphs = True

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.rotate_keys, self.rotate_values = rotations_for(bits)

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The metadata is the whole plan: the grids are sized by host ints already in it."""
        return meta

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: QuantizedKVCache,
        plan: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        from lmserve.kernels.kv_quant import paged_decode_attention_quant, store_quantized_kv
        from lmserve.kernels.kv_quant_prefill import paged_prefill_attention_quant

        if sliding_window is not None:  # build_model refuses this pairing first; this guards direct callers
            raise ValueError(
                "the Triton quantized KV cache (--quant-policy 4/8) has no sliding-window attention"
            )
        if self.rotate_keys:
            q, k = rotate(q), rotate(k)
        if self.rotate_values:
            v = rotate(v)
        codes, params = layer_cache.codes, layer_cache.params
        store_quantized_kv(k, v, codes, params, plan.slot_mapping, self.bits)
        out = torch.empty_like(q)
        num_decodes = plan.num_decodes
        if num_decodes:
            paged_decode_attention_quant(
                q[:num_decodes], codes, params, plan.block_tables, plan.seq_lens, scale, self.bits,
                out=out[:num_decodes],
            )  # fmt: skip
        if num_decodes < plan.num_seqs:
            paged_prefill_attention_quant(
                q, codes, params, plan.block_tables, plan.seq_lens, plan.query_start_loc, scale, self.bits,
                first_seq=num_decodes, num_seqs=plan.num_seqs - num_decodes,
                max_query_len=plan.max_query_len, out=out,
            )  # fmt: skip
        return rotate(out) if self.rotate_values else out


def quantized_kv_backend(
    device: torch.device, quant_policy: int | str
) -> TorchQuantKVBackend | TritonQuantKVBackend:
    """The Triton backend on CUDA when Triton is installed, else the torch reference."""
    bits = bits_of(quant_policy)
    if device.type == "cuda":
        from lmserve.kernels._triton import HAS_TRITON

        if HAS_TRITON:
            return TritonQuantKVBackend(bits)
    return TorchQuantKVBackend(bits)
