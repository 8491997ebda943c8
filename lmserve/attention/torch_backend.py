"""Plain-torch paged attention: the reference implementation and the CPU production path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    """KV cache per layer: one tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V).

    Decodes of a batch run as one padded SDPA call; prefill chunks run one SDPA call per sequence.
    """

    def __init__(self) -> None:
        # every layer of a step shares one slot_mapping: look for padding once per step, not per layer
        self._checked_slots: torch.Tensor | None = None
        self._kept_rows: torch.Tensor | None = None

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

    def kept_rows(self, slot_mapping: torch.Tensor) -> torch.Tensor | None:
        """Rows whose slot is not -1, or None when every row is written."""
        if slot_mapping is not self._checked_slots:
            has_padding = bool((slot_mapping < 0).any())
            self._kept_rows = (slot_mapping >= 0).nonzero().squeeze(1) if has_padding else None
            self._checked_slots = slot_mapping
        return self._kept_rows

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv_cache(layer_cache, k, v, meta.slot_mapping, self.kept_rows(meta.slot_mapping))
        num_decodes = meta.num_decodes
        if num_decodes == meta.num_seqs:
            return decode_attention(q, layer_cache, meta, scale)
        out = torch.empty_like(q)
        if num_decodes:
            out[:num_decodes] = decode_attention(q[:num_decodes], layer_cache, meta, scale)
        start = num_decodes
        for i in range(num_decodes, meta.num_seqs):
            end = start + meta.query_lens_cpu[i]
            out[start:end] = prefill_attention(
                q[start:end], k[start:end], v[start:end], layer_cache, meta, i, scale
            )
            start = end
        return out


def write_kv_cache(
    layer_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    kept_rows: torch.Tensor | None = None,
) -> None:
    """Store each new token's K/V at its flat slot; only kept_rows are written when given (the rest are -1)."""
    if kept_rows is not None:
        slot_mapping, k, v = slot_mapping[kept_rows], k[kept_rows], v[kept_rows]
    num_kv_heads, head_dim = layer_cache.shape[-2:]
    flat = layer_cache.view(2, -1, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(layer_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(layer_cache.dtype))


def gather_kv(layer_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """K/V of the given blocks: block_ids [..., n] -> [2, ..., n * block_size, Hkv, D]."""
    # index_select over flat ids: ~6x cheaper than advanced indexing on the CPU, once per layer per step
    gathered = layer_cache.index_select(1, block_ids.reshape(-1))
    block_size, num_kv_heads, head_dim = layer_cache.shape[2:]
    num_tokens = block_ids.shape[-1] * block_size
    return gathered.view(2, *block_ids.shape[:-1], num_tokens, num_kv_heads, head_dim)


def decode_attention(
    q: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The first len(q) sequences each have one new query: q [B, Hq, D] -> [B, Hq, D], in one SDPA call."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = layer_cache.shape[2], layer_cache.shape[3]
    seq_lens_cpu = meta.seq_lens_cpu[:num_seqs]
    max_len = max(seq_lens_cpu)
    num_blocks = -(-max_len // block_size)
    kv = gather_kv(layer_cache, meta.block_tables[:num_seqs, :num_blocks])[:, :, :max_len]
    keys, values = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, Hkv, L, D]
    # GQA without repeating K/V: the query heads of one KV head form that head's "query length"
    queries = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = None
    if min(seq_lens_cpu) != max_len:
        positions = torch.arange(max_len, device=q.device)
        mask = (positions[None, :] < meta.seq_lens[:num_seqs, None].to(q.device))[:, None, None, :]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    seq_index: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's chunk of new queries q [n, Hq, D] attends causally to its cached and new tokens."""
    query_len, seq_len = q.shape[0], meta.seq_lens_cpu[seq_index]
    if query_len == seq_len:  # nothing cached: the new K/V are the whole context
        keys, values, mask, causal = k, v, None, True
    else:
        block_size = layer_cache.shape[2]
        block_ids = meta.block_tables[seq_index, : -(-seq_len // block_size)]
        kv = gather_kv(layer_cache, block_ids)[:, :seq_len]
        keys, values, causal = kv[0], kv[1], False
        mask = causal_mask_with_offset(query_len, seq_len, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys.transpose(0, 1),
        values.transpose(0, 1),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )
    return out.transpose(0, 1)


def causal_mask_with_offset(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[query_len, seq_len] bool: query j (at position seq_len - query_len + j) sees keys 0..its position."""
    query_positions = torch.arange(seq_len - query_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= query_positions[:, None]
