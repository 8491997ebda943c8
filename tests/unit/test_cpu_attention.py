"""CPUAttentionBackend (heads-first KV cache) against the per-sequence float32 attention references."""

from __future__ import annotations

import pytest
import torch

from lmserve.attention.backend import get_attention_backend
from lmserve.attention.metadata import SequenceChunk, build_step_batch
from lmserve.attention.torch_backend import CPUAttentionBackend, v_follows_k
from lmserve.kernels.decode_attention import paged_decode_attention_ref
from lmserve.kernels.prefill_attention import paged_prefill_attention_ref
from lmserve.kernels.testing import PagedBatch, backend_step, make_paged_batch, relative_error

CPU = torch.device("cpu")
BATCHES = {  # (query_lens, seq_lens): decodes first, then prefill chunks (shorter than the sequence: a prefix)
    "mixed": ([1, 1, 1, 30, 7], [5, 1, 70, 30, 50]),
    "few_decodes": ([1, 1, 1], [1, 9, 66]),
    "many_decodes": ([1] * 7, [3, 70, 16, 17, 1, 45, 64]),
    "equal_decodes": ([1] * 5, [40] * 5),
    "prefill_only": ([40, 3], [40, 20]),
}


def heads_first(reference_cache: torch.Tensor) -> torch.Tensor:
    """[2, blocks, block_size, Hkv, D] -> [2, Hkv, blocks, block_size, D]."""
    return reference_cache.permute(0, 3, 1, 2, 4).contiguous()


def with_new_kv(batch: PagedBatch) -> torch.Tensor:
    """The reference-layout cache after the step: each real row's K/V at its slot (padding rows nowhere)."""
    cache = batch.layer_cache.clone()
    rows = batch.meta.num_tokens
    flat = cache.view(2, -1, *cache.shape[3:])
    slots = batch.meta.slot_mapping[:rows]
    flat[0][slots], flat[1][slots] = batch.k[:rows], batch.v[:rows]
    return cache


def reference_out(cache: torch.Tensor, batch: PagedBatch, scale: float, window: int | None) -> torch.Tensor:
    meta = batch.meta
    args = (cache[0], cache[1], meta.block_tables, meta.seq_lens)
    out = paged_prefill_attention_ref(
        batch.q, *args, meta.query_start_loc, scale, first_seq=meta.num_decodes,
        num_seqs=meta.num_seqs - meta.num_decodes, sliding_window=window,
    )  # fmt: skip
    decodes = meta.num_decodes
    out[:decodes] = paged_decode_attention_ref(batch.q[:decodes], *args, scale, sliding_window=window)
    return out[: meta.num_tokens]


@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("name", list(BATCHES))
def test_matches_the_references_and_stores_heads_first(name: str, window: int | None) -> None:
    batch = make_paged_batch(*BATCHES[name], 6, 2, 32, 8, torch.float32, CPU, num_padding_tokens=2)
    cache, scale = heads_first(batch.layer_cache), 32**-0.5
    out = backend_step(CPUAttentionBackend(), batch.q, batch.k, batch.v, cache, batch.meta, scale, window)
    expected_cache = with_new_kv(batch)
    assert torch.equal(cache, heads_first(expected_cache))  # padding rows wrote nothing
    rows = batch.meta.num_tokens
    assert relative_error(out[:rows], reference_out(expected_cache, batch, scale, window)) < 1e-5


def test_bfloat16_tracks_float32() -> None:
    batch = make_paged_batch(*BATCHES["many_decodes"], 9, 3, 64, 16, torch.bfloat16, CPU)
    scale = 64**-0.5
    out = backend_step(
        CPUAttentionBackend(), batch.q, batch.k, batch.v, heads_first(batch.layer_cache), batch.meta, scale
    )
    expected_cache = with_new_kv(batch).float()
    wide = PagedBatch(batch.q.float(), batch.k.float(), batch.v.float(), expected_cache, batch.meta)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference_out(expected_cache, wide, scale, None)) < 1e-2


def test_is_the_cpu_default_and_allocates_heads_first() -> None:
    backend = get_attention_backend(CPU)
    assert isinstance(backend, CPUAttentionBackend)
    caches = backend.allocate_kv_cache(2, 5, 16, 3, 64, torch.bfloat16, CPU)
    assert len(caches) == 2 and caches[0].shape == (2, 3, 5, 16, 64) and not caches[0].any()


@pytest.mark.parametrize("window", [None, 12, 100])
@pytest.mark.parametrize("table", [[2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 3, 4, 5, 6, 7, 9, 8, 10]])
def test_one_stream_on_a_run_of_blocks_reads_a_view(table: list[int], window: int | None) -> None:
    """A lone decoding sequence whose blocks ascend reads its K/V as a view of the cache (no gather); the
    answer is the gather's, and a table that is not one run still gathers."""
    batch = make_paged_batch([1], [70], 6, 2, 32, 8, torch.float32, CPU)
    cache = torch.randn(2, 12, 8, 2, 32, generator=torch.Generator().manual_seed(1))
    meta = build_step_batch([SequenceChunk([0], 69, table)], 8, CPU).metadata
    one = PagedBatch(batch.q, batch.k, batch.v, cache, meta)
    backend = CPUAttentionBackend()
    assert (backend.prepare(meta).first_block_of_run == 2) == (table == sorted(table))
    heads_first_cache, scale = heads_first(cache), 32**-0.5
    out = backend_step(backend, one.q, one.k, one.v, heads_first_cache, meta, scale, window)
    expected_cache = with_new_kv(one)
    assert torch.equal(heads_first_cache, heads_first(expected_cache))
    assert relative_error(out, reference_out(expected_cache, one, scale, window)) < 1e-5


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_store_of_k_and_v_side_by_side_in_the_fused_projection(num_tokens: int) -> None:
    """K and V as LlamaAttention slices them from the fused qkv output take the one-copy store; the cache ends
    up as with K and V stored apart."""
    generator = torch.Generator().manual_seed(num_tokens)
    qkv = torch.randn(num_tokens, (6 + 2 * 2) * 32, generator=generator)
    k = qkv[:, : 8 * 32].view(num_tokens, 8, 32)[:, 6:]
    v = qkv[:, 8 * 32 :].view(num_tokens, 2, 32)
    assert v_follows_k(k, v) and not v_follows_k(k, v.clone())
    slots = torch.randperm(4 * 8, generator=generator)[:num_tokens]
    backend = CPUAttentionBackend()
    fused, apart = (torch.zeros(backend.cache_shape(4, 8, 2, 32)) for _ in range(2))
    backend.store(fused, k, v, slots)
    backend.store(apart, k.clone(), v.clone(), slots)
    assert torch.equal(fused, apart) and apart.any()
