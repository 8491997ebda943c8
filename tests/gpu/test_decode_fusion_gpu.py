"""Decode attention's launch fusions on the GPU (kernels/decode_attention.py): the rotary store and the split reduce
inside the attention launch, against the unfused launches, in CUDA graphs with PDL, and through the engine."""

from __future__ import annotations

import pytest
import torch

import lmserve.kernels.decode_attention as decode_attention
from lmserve.attention.kv_fp8 import allocate_fp8_kv_cache
from lmserve.kernels.decode_attention import (
    NewTokenKV,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from lmserve.kernels.kv_write import rotary_store_kv
from lmserve.kernels.rotary import build_cos_sin_cache
from lmserve.kernels.split_k import tile_locks
from lmserve.kernels.testing import TOLERANCE, make_paged_batch, relative_error
from tests.gpu.test_engine_cuda import make_engine, prompts
from tests.models.model_helpers import tiny_hf_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEQ_LENS = [1, 2, 17, 64, 65, 300, 1000, 4096]


def decode_batch(dtype: torch.dtype, group: int, seq_lens: list[int] = SEQ_LENS, seed: int = 0):
    return make_paged_batch([1] * len(seq_lens), seq_lens, 8 * group, 8, 128, 64, dtype, "cuda", seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [None, 2, 7, 33])
def test_fused_reduce_matches_the_reduce_launch(
    dtype: torch.dtype, group: int, num_splits: int | None
) -> None:
    batch = decode_batch(dtype, group)
    meta, cache, scale = batch.meta, batch.layer_cache, 128**-0.5
    args = (batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, scale)
    fused = paged_decode_attention(*args, num_splits=num_splits, fused_reduce=True)
    apart = paged_decode_attention(*args, num_splits=num_splits, fused_reduce=False)
    ref = paged_decode_attention_ref(*args)
    assert relative_error(fused, apart) < 1e-3
    for seq in range(len(SEQ_LENS)):
        assert relative_error(fused[seq], ref[seq]) < TOLERANCE[dtype], f"{SEQ_LENS[seq]=}"
    counters = tile_locks(batch.q.device)
    assert not counters.any()


@pytest.mark.parametrize("cache_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("fused_reduce", [False, True])
@pytest.mark.parametrize("window", [None, 100])
def test_rotary_fusion_matches_rotary_store_then_decode(
    cache_dtype: str, fused_reduce: bool, window: int | None
) -> None:
    """The new token's key and value stored by the attention launch equal rotary_store_kv's (bit for bit), and the
    output the unfused pair's; q and k are left unrotated."""
    batch = decode_batch(torch.bfloat16, 4, seed=1)
    meta, scale = batch.meta, 128**-0.5
    positions = meta.seq_lens.long() - 1
    table = build_cos_sin_cache(8192, 128, 500000.0, "cuda")
    if cache_dtype == "fp8":
        stale = allocate_fp8_kv_cache(1, batch.layer_cache.shape[1], 64, 8, 128, torch.device("cuda"))[0]
        stale.copy_(batch.layer_cache.to(stale.dtype))
    else:
        stale = batch.layer_cache
    fused_cache, ref_cache = stale.clone(), stale.clone()
    q, k, v = batch.q.clone(), batch.k.clone(), batch.v.clone()
    out = paged_decode_attention(
        q, fused_cache[0], fused_cache[1], meta.block_tables, meta.seq_lens, scale, sliding_window=window,
        new_kv=NewTokenKV(k, v, meta.slot_mapping, positions, table), fused_reduce=fused_reduce,
    )  # fmt: skip
    assert torch.equal(q, batch.q) and torch.equal(k, batch.k)
    q_ref = batch.q.clone()
    rotary_store_kv(
        q_ref, batch.k.clone(), batch.v, ref_cache[0], ref_cache[1], meta.slot_mapping, positions, table
    )
    ref = paged_decode_attention(
        q_ref, ref_cache[0], ref_cache[1], meta.block_tables, meta.seq_lens, scale, sliding_window=window
    )
    written = meta.slot_mapping
    fused_new, ref_new = (c.flatten(1, 2)[:, written].float() for c in (fused_cache, ref_cache))
    # the rotation's float32 products may contract into FMAs differently in the two kernels: an ulp at most
    tolerance = 1e-2 if cache_dtype == "fp8" else 4e-3
    assert relative_error(fused_new, ref_new) < tolerance
    assert not torch.equal(fused_new, stale.flatten(1, 2)[:, written].float())
    assert relative_error(out, ref) < 2e-3


@pytest.mark.parametrize("fused_reduce", [False, True])
def test_fusions_in_a_cuda_graph_replay_with_new_lengths(fused_reduce: bool) -> None:
    """Both fusions captured once and replayed three times (lengths and queries changed in place between
    replays): each replay equals the unfused eager launches, so the counters reset and the stores land."""
    batch = decode_batch(torch.bfloat16, 4, seed=2)
    meta, scale = batch.meta, 128**-0.5
    table = build_cos_sin_cache(8192, 128, 500000.0, "cuda")
    positions = (meta.seq_lens.long() - 1).clone()
    q, k, v = batch.q.clone(), batch.k.clone(), batch.v.clone()
    cache = batch.layer_cache.clone()
    new_kv = NewTokenKV(k, v, meta.slot_mapping, positions, table)

    def launch() -> torch.Tensor:
        return paged_decode_attention(
            q, cache[0], cache[1], meta.block_tables, meta.seq_lens, scale, new_kv=new_kv,
            fused_reduce=fused_reduce,
        )  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch()
    generator = torch.Generator(device="cuda").manual_seed(3)
    for shrink in (0, 1, 5):
        lengths = (batch.meta.seq_lens - shrink).clamp_min(1)
        meta.seq_lens.copy_(lengths)
        positions.copy_(lengths.long() - 1)
        # the new token's slot, where the block table puts position length - 1
        blocks = meta.block_tables.long().gather(1, (positions // 64)[:, None])[:, 0]
        meta.slot_mapping.copy_(blocks * 64 + positions % 64)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=generator, device="cuda", dtype=t.dtype))
        ref_cache = cache.clone()
        q_ref = q.clone()
        rotary_store_kv(q_ref, k.clone(), v, ref_cache[0], ref_cache[1], meta.slot_mapping, positions, table)
        expected = paged_decode_attention(
            q_ref, ref_cache[0], ref_cache[1], meta.block_tables, meta.seq_lens, scale
        )
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, expected) < 2e-3
        written = meta.slot_mapping
        assert relative_error(cache.flatten(1, 2)[:, written], ref_cache.flatten(1, 2)[:, written]) < 4e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_tokens_with_the_fusions_equal_without(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy tokens of an engine (CUDA graphs, prefill and decode steps) with both decode fusions on: the unfused
    engine's, or parted at a near tie (the fused reduce sums the splits in another order)."""
    from tests.gpu.test_kv_quant_gpu import assert_divergences_are_near_ties, run_with_logprobs

    shape = dict(vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    hf_model = tiny_hf_model(family, **shape)
    batch = prompts(hf_model.config.vocab_size)
    plain, plain_logprobs = run_with_logprobs(make_engine(hf_model), batch)
    monkeypatch.setattr(decode_attention, "FUSE_ROTARY", True)
    monkeypatch.setattr(decode_attention, "FUSE_REDUCE", True)
    engine = make_engine(hf_model)
    assert engine.runner.graph_runner is not None
    fused, fused_logprobs = run_with_logprobs(engine, batch)
    assert_divergences_are_near_ties(fused, plain, fused_logprobs, plain_logprobs)
    assert sum(a == b for a, b in zip(fused, plain, strict=True)) >= len(batch) - 1
