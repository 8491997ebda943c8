"""Plain-torch paged attention: the reference implementation and the CPU production path."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.metadata import AttentionMetadata
from lmserve.engine.cpu_memory import lazily_zeroed
from lmserve.kernels import cpu_native
from lmserve.layers.rotary import RopeInputs, rotate_in_place


@dataclass(frozen=True)
class TorchPlan:
    """A step's metadata with its host lengths, and the rows whose slot is not -1 (None: every row is written)."""

    meta: AttentionMetadata
    query_lens: list[int]
    seq_lens: list[int]
    kept_rows: torch.Tensor | None
    first_block_of_run: int | None = None
    """One-sequence steps whose block table is one ascending run (b, b + 1, ...): b, else None (CPU backend)."""


class TorchAttentionBackend(AttentionBackend):
    """KV cache per layer: one tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V).

    Decodes of a batch run as one padded SDPA call; prefill chunks run one SDPA call per sequence.
    It slices by the host lengths, so it cannot run under CUDA graphs. With a sliding window, blocks wholly
    before every query's window are not gathered. This layout is the Triton kernels' too: the reference
    the GPU backends are tested against (CPUAttentionBackend below stores heads first).
    """

    supports_sliding_window = True

    def cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

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
        shape = self.cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        return [lazily_zeroed(shape, dtype, device) for _ in range(num_layers)]

    def prepare(self, meta: AttentionMetadata) -> TorchPlan:
        """Looks for padding rows once per step, not per layer (a host read of the slots)."""
        query_lens, seq_lens = meta.host_lens()
        slot_mapping = meta.slot_mapping
        has_padding = bool((slot_mapping < 0).any())
        kept_rows = (slot_mapping >= 0).nonzero().squeeze(1) if has_padding else None
        return TorchPlan(meta, query_lens, seq_lens, kept_rows)

    def store(
        self, layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """k/v [T, Hkv, D] into the cache at their flat slots (every slot valid)."""
        write_kv_cache(layer_cache, k, v, slot_mapping)

    def gather(self, layer_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """K/V of the given blocks, heads before tokens: block_ids [..., n] -> [2, ..., Hkv, n * block_size, D]."""
        return gather_kv(layer_cache, block_ids).transpose(-3, -2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TorchPlan,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        slot_mapping = plan.meta.slot_mapping
        if plan.kept_rows is not None:
            kept = plan.kept_rows
            self.store(layer_cache, k[kept], v[kept], slot_mapping[kept])
        else:
            self.store(layer_cache, k, v, slot_mapping)
        return self.attend(q, k, v, layer_cache, plan, scale, sliding_window)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TorchPlan,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """The attention of a step whose new K/V are already stored: decodes in one call, prefills one by one."""
        meta = plan.meta
        num_decodes, has_padding = meta.num_decodes, q.shape[0] > meta.num_tokens
        if num_decodes == meta.num_seqs and not has_padding:
            return self.decode(q, layer_cache, plan, scale, sliding_window)
        out = q.new_zeros(q.shape) if has_padding else torch.empty_like(q)  # padding rows read as zeros
        if num_decodes:
            out[:num_decodes] = self.decode(q[:num_decodes], layer_cache, plan, scale, sliding_window)
        start = num_decodes
        for i in range(num_decodes, meta.num_seqs):
            end = start + plan.query_lens[i]
            out[start:end] = self.prefill(
                q[start:end], k[start:end], v[start:end], layer_cache, plan, i, scale, sliding_window
            )
            start = end
        return out

    def decode(
        self,
        q: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TorchPlan,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """The first len(q) sequences each have one new query: q [B, Hq, D] -> [B, Hq, D], in one SDPA call."""
        num_seqs, num_heads, head_dim = q.shape
        meta, seq_lens_cpu = plan.meta, plan.seq_lens[:num_seqs]
        block_size, max_len = meta.block_size, max(seq_lens_cpu)
        # keys before the shortest sequence's window are seen by no query of the batch
        first_block = first_visible_key(min(seq_lens_cpu) - 1, sliding_window) // block_size
        key_start, num_blocks = first_block * block_size, -(-max_len // block_size)
        kv = self.decode_kv(layer_cache, plan, num_seqs, first_block, num_blocks)
        keys, values = kv[..., : max_len - key_start, :].unbind(0)  # [B, Hkv, L, D]
        num_kv_heads = keys.shape[1]
        # GQA without repeating K/V: the query heads of one KV head form that head's "query length"
        queries = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        mask = None
        cut_by_window = first_visible_key(max_len - 1, sliding_window) > key_start
        if min(seq_lens_cpu) != max_len or cut_by_window:
            seq_lens = meta.seq_lens[:num_seqs, None].to(q.device)
            positions = torch.arange(key_start, max_len, device=q.device)[None, :]
            mask = positions < seq_lens
            if sliding_window is not None:
                mask &= positions >= seq_lens - sliding_window
            mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        return out.reshape(num_seqs, num_heads, head_dim)

    def decode_kv(
        self, layer_cache: torch.Tensor, plan: TorchPlan, num_seqs: int, first_block: int, num_blocks: int
    ) -> torch.Tensor:
        """K/V of blocks first_block..num_blocks - 1 of the first num_seqs sequences: [2, B, Hkv, L, D]."""
        return self.gather(layer_cache, plan.meta.block_tables[:num_seqs, first_block:num_blocks])

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TorchPlan,
        seq_index: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """One sequence's chunk of new queries q [n, Hq, D] attends causally to its cached and new tokens."""
        query_len, seq_len = q.shape[0], plan.seq_lens[seq_index]
        window_fits = sliding_window is None or query_len <= sliding_window
        if query_len == seq_len:  # nothing cached: the new K/V are the whole context
            keys, values, key_start = k.transpose(0, 1), v.transpose(0, 1), 0
        else:
            block_size = plan.meta.block_size
            first_block = first_visible_key(seq_len - query_len, sliding_window) // block_size
            key_start = first_block * block_size
            block_ids = plan.meta.block_tables[seq_index, first_block : -(-seq_len // block_size)]
            kv = self.gather(layer_cache, block_ids)[..., : seq_len - key_start, :]
            keys, values = kv[0], kv[1]  # [Hkv, L, D]
        mask, causal = None, True
        if query_len != seq_len or not window_fits:
            mask = causal_mask_with_offset(query_len, seq_len, q.device, sliding_window, key_start)
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys,
            values,
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=q.shape[1] != keys.shape[0],
        )
        return out.transpose(0, 1)


class CPUAttentionBackend(TorchAttentionBackend):
    """The CPU production path: the same attention over a heads-first cache, per layer
    [2, num_kv_heads, num_blocks, block_size, head_dim].

    Gathering a batch's blocks from it gives each (sequence, head) its keys as one contiguous [L, D] run, which
    SDPA reads in place; the reference layout's gather interleaves the heads of a token, and SDPA reads it
    strided. On the 2-core box the decode attention of SmolLM2 (9 query / 3 KV heads) takes 5–30 % less time
    this way at 1–16 sequences (`benchmarks/cpu_kernels.py`; benchmarks/RESULTS.md, "CPU attention").
    """

    fuses_rotary = True

    def cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def forward(  # type: ignore[override]
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TorchPlan,
        scale: float,
        sliding_window: int | None = None,
        rope: RopeInputs | None = None,
    ) -> torch.Tensor:
        """With rope, q and k arrive unrotated: bf16 q/k/v side by side in the fused qkv rows are rotated and
        stored by one C call (kernels/cpu_native.py); anything else is rotated in torch, then stored as before."""
        if rope is not None:
            assert rope.cos is not None and rope.sin is not None
            k_follows_q = heads_follow(q, k)
            if (
                k_follows_q
                and heads_follow(k, v)
                and rope.cos.shape[-1] == q.shape[-1]
                and cpu_native.rotary_store_supported(q, k, v, layer_cache)
            ):
                cpu_native.rotary_store(q, k, layer_cache, rope.cos, rope.sin, plan.meta.slot_mapping)
                return self.attend(q, k, v, layer_cache, plan, scale, sliding_window)
            if k_follows_q:  # one pass over q's and k's heads, as rotate_qk does
                rotate_in_place(side_by_side(q, k), rope.cos, rope.sin)
            else:
                rotate_in_place(q, rope.cos, rope.sin)
                rotate_in_place(k, rope.cos, rope.sin)
        return super().forward(q, k, v, layer_cache, plan, scale, sliding_window)

    def prepare(self, meta: AttentionMetadata) -> TorchPlan:
        """Also notes whether a lone sequence's blocks are one ascending run (its K/V are then a view)."""
        plan = super().prepare(meta)
        if meta.num_seqs != 1 or meta.block_tables.device.type != "cpu":
            return plan
        block_ids = meta.block_tables[0].tolist()
        first = block_ids[0] if block_ids else 0
        if block_ids != list(range(first, first + len(block_ids))):
            return plan
        return replace(plan, first_block_of_run=first)

    def decode(
        self,
        q: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TorchPlan,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """bf16: the C kernel (kernels/cpu_native.py: one call reads the blocks through the tables, no gather);
        other dtypes or shapes: SDPA over the gathered (or viewed) K/V."""
        meta = plan.meta
        if meta.block_tables.dtype == torch.int32 and cpu_native.decode_attention_supported(q, layer_cache):
            # the kernel reads the first len(q) rows of the tables and lengths
            return cpu_native.decode_attention(
                q, layer_cache, meta.block_tables, meta.seq_lens, scale, sliding_window
            )
        return super().decode(q, layer_cache, plan, scale, sliding_window)

    def decode_kv(
        self, layer_cache: torch.Tensor, plan: TorchPlan, num_seqs: int, first_block: int, num_blocks: int
    ) -> torch.Tensor:
        """One sequence on one run of blocks (a lone stream, the usual case): a view of the cache, no copy
        (the gather took ~10-15 us a layer at 200 tokens on the 2-core box)."""
        if plan.first_block_of_run is None or num_seqs != 1:
            return super().decode_kv(layer_cache, plan, num_seqs, first_block, num_blocks)
        start = plan.first_block_of_run + first_block
        run = layer_cache[:, :, start : start + num_blocks - first_block]
        num_kv_heads, head_dim = layer_cache.shape[1], layer_cache.shape[-1]
        return run.view(2, 1, num_kv_heads, -1, head_dim)

    def store(
        self, layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        num_kv_heads, head_dim = layer_cache.shape[1], layer_cache.shape[-1]
        if k.dtype == layer_cache.dtype and v_follows_k(k, v):
            # the usual case (k and v side by side in the fused qkv output): one copy for both
            kv = side_by_side(k, v)
            layer_cache.view(2 * num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, kv.transpose(0, 1))
            return
        flat = layer_cache.view(2, num_kv_heads, -1, head_dim)
        flat[0].index_copy_(1, slot_mapping, k.transpose(0, 1).to(layer_cache.dtype))
        flat[1].index_copy_(1, slot_mapping, v.transpose(0, 1).to(layer_cache.dtype))

    def gather(self, layer_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        gathered = layer_cache.index_select(2, block_ids.reshape(-1))
        num_kv_heads, block_size, head_dim = layer_cache.shape[1], layer_cache.shape[3], layer_cache.shape[4]
        num_tokens = block_ids.shape[-1] * block_size
        gathered = gathered.view(2, num_kv_heads, *block_ids.shape[:-1], num_tokens, head_dim)
        return gathered.movedim(1, -3)  # [2, ..., Hkv, L, D], a view


def heads_follow(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b [T, Hb, D] starts right where a [T, Ha, D] ends in each row of one buffer (as q, k and v are
    sliced from the fused qkv projection): same rows, contiguous heads, so [a | b] is one [T, Ha + Hb, D] view."""
    head_dim = a.shape[-1]
    return (
        a.shape[0] == b.shape[0]
        and b.shape[-1] == head_dim
        and a.dtype == b.dtype
        and (a.shape[0] == 1 or a.stride(0) == b.stride(0))  # a lone row's stride is arbitrary
        and a.stride()[1:] == b.stride()[1:] == (head_dim, 1)
        and b.data_ptr() == a.data_ptr() + a.shape[1] * head_dim * a.element_size()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def v_follows_k(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether k and v [T, Hkv, D] are one [T, 2 * Hkv, D] run of memory (heads_follow, same shape)."""
    return k.shape == v.shape and heads_follow(k, v)


def side_by_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a | b] along the heads as one view, for a and b with heads_follow(a, b)."""
    return a.as_strided((a.shape[0], a.shape[1] + b.shape[1], a.shape[2]), a.stride())


def write_kv_cache(
    layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's K/V at its flat slot (a reference-layout cache; every slot valid)."""
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


def first_visible_key(position: int, sliding_window: int | None) -> int:
    """The earliest key position a query at `position` attends to."""
    return 0 if sliding_window is None else max(0, position - sliding_window + 1)


def causal_mask_with_offset(
    query_len: int,
    seq_len: int,
    device: torch.device,
    sliding_window: int | None = None,
    key_start: int = 0,
) -> torch.Tensor:
    """[query_len, seq_len - key_start] bool: query j (at position seq_len - query_len + j) sees the keys at
    positions key_start.. up to its own position, and within sliding_window of it when given."""
    query_positions = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_positions = torch.arange(key_start, seq_len, device=device)[None, :]
    mask = key_positions <= query_positions
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask
