"""Triton paged attention for CUDA: KV write, flash-decoding for decodes, varlen causal prefill for chunks."""

from __future__ import annotations

import torch

import lmserve.kernels.decode_attention as decode_attention
from lmserve.attention.backend import AttentionBackend
from lmserve.attention.kv_fp8 import allocate_fp8_kv_cache
from lmserve.attention.metadata import AttentionMetadata
from lmserve.kernels._triton import HAS_TRITON
from lmserve.kernels.decode_attention import NewTokenKV, paged_decode_attention
from lmserve.kernels.kv_write import rotary_store_kv, store_kv
from lmserve.kernels.prefill_attention import paged_prefill_attention
from lmserve.layers.rotary import RopeInputs

if not HAS_TRITON:
    raise ImportError("TritonAttentionBackend needs triton (pip install 'lmserve[cuda]')")


class TritonAttentionBackend(AttentionBackend):
    """Same cache layout as the torch reference: per layer [2, num_blocks, block_size, num_kv_heads, head_dim].

    Host ints of the metadata (num_seqs, num_decodes, max_query_len, block-table width) size grids only;
    nothing reads GPU values back, so a decode-only batch of fixed size and block-table width launches the
    same grids every step (CUDA graphs).
    """

    supports_cuda_graphs = True
    supports_sliding_window = True
    fuses_rotary = True

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
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The metadata is the whole plan: the grids are sized by host ints already in it."""
        return meta

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        rope: RopeInputs | None = None,
    ) -> torch.Tensor:
        """As AttentionBackend.forward; with rope (its Triton table), q and k arrive unrotated and one kernel
        rotates q in place and writes the rotated k and v into the cache."""
        k_cache, v_cache = layer_cache[0], layer_cache[1]
        num_decodes = plan.num_decodes
        num_prefills = plan.num_seqs - num_decodes
        new_kv = None
        if (
            rope is not None
            and not num_prefills
            and (decode_attention.FUSE_ROTARY or num_decodes <= decode_attention.FUSE_ROTARY_ROWS)
            and q.shape[0] == num_decodes
        ):
            # a decode-only step: the attention launch rotates q and k and stores k and v itself
            assert rope.cos_sin_cache is not None
            new_kv = NewTokenKV(k, v, plan.slot_mapping, rope.positions, rope.cos_sin_cache)
        elif rope is None:
            store_kv(k, v, k_cache, v_cache, plan.slot_mapping)
        else:
            assert rope.cos_sin_cache is not None
            rotary_store_kv(q, k, v, k_cache, v_cache, plan.slot_mapping, rope.positions, rope.cos_sin_cache)
        out = torch.empty_like(q)
        if num_decodes:
            paged_decode_attention(
                q[:num_decodes],
                k_cache,
                v_cache,
                plan.block_tables,
                plan.seq_lens,
                scale,
                out=out[:num_decodes],
                sliding_window=sliding_window,
                new_kv=new_kv,
            )
        if num_prefills:
            paged_prefill_attention(
                q, k_cache, v_cache, plan.block_tables, plan.seq_lens, plan.query_start_loc, scale,
                first_seq=num_decodes, num_seqs=num_prefills, max_query_len=plan.max_query_len, out=out,
                sliding_window=sliding_window,
            )  # fmt: skip
        return out


class TritonFP8KVBackend(TritonAttentionBackend):
    """`--quant-policy fp8` on CUDA: the same kernels over an e4m3 cache. Stores cast to e4m3 (saturating), and
    decode / prefill attention widen each K/V tile to the query's dtype in registers (WIDEN_KV): no dequantized
    copy, CUDA graphs, sliding windows and the fused rotary store as for bf16."""

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
