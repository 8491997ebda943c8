"""Triton kernels against their torch references on CUDA, over head layouts, dtypes, block sizes and lengths."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from lmserve.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from lmserve.kernels.kv_write import rotary_store_kv, rotary_store_kv_ref, store_kv, store_kv_ref
from lmserve.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from lmserve.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from lmserve.kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache
from lmserve.kernels.testing import TOLERANCE, make_paged_batch, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.bfloat16, torch.float16]
NUM_KV_HEADS = 2


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_store_kv_matches_reference_and_skips_padding(dtype: torch.dtype, block_size: int) -> None:
    batch = make_paged_batch([1, 1, 70, 5], [1, 90, 70, 300], 8, 8, 128, block_size, dtype, "cuda", 3)
    cache, ref = batch.layer_cache.clone(), batch.layer_cache.clone()
    store_kv(batch.k, batch.v, cache[0], cache[1], batch.meta.slot_mapping)
    store_kv_ref(batch.k, batch.v, ref[0], ref[1], batch.meta.slot_mapping)
    assert torch.equal(cache, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_attention(
    dtype: torch.dtype, group: int, head_dim: int, block_size: int, num_splits: int | None
) -> None:
    seq_lens = [1, 2, 17, 64, 65, 300, 1000, 4096]
    batch = make_paged_batch(
        [1] * len(seq_lens), seq_lens, NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim, block_size, dtype, "cuda"
    )
    meta, cache, scale = batch.meta, batch.layer_cache, head_dim**-0.5
    out = poisoned_like(batch.q)
    paged_decode_attention(
        batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, scale, out=out, num_splits=num_splits
    )
    ref = paged_decode_attention_ref(batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, scale)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    for seq in range(len(seq_lens)):  # every sequence, the short ones too, on its own
        assert relative_error(out[seq], ref[seq]) < TOLERANCE[dtype], f"{seq_lens[seq]=}"


def test_decode_attention_zero_length_padding_sequence_gives_zeros() -> None:
    batch = make_paged_batch([1, 1], [5, 200], 8, 2, 64, 16, torch.bfloat16, "cuda")
    batch.meta.seq_lens[0] = 0  # as a CUDA-graph batch padded with empty sequences
    cache = batch.layer_cache
    for num_splits in (1, 4):
        out = paged_decode_attention(
            batch.q,
            cache[0],
            cache[1],
            batch.meta.block_tables,
            batch.meta.seq_lens,
            0.1,
            num_splits=num_splits,
        )
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out[1]).all()


PREFILL_CASES = {
    "fresh_prompts": ([37, 128, 5], [37, 128, 5]),
    "prefix_hits": ([100, 64, 1], [1000, 64, 17]),
    "long_chunk_on_long_prefix": ([300, 513], [4096, 2000]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_attention(dtype: torch.dtype, group: int, head_dim: int, block_size: int, case: str) -> None:
    query_lens, seq_lens = PREFILL_CASES[case]
    query_lens, seq_lens = (
        [1, 1, *query_lens],
        [9, 50, *seq_lens],
    )  # two decodes first, as the backend sees it
    batch = make_paged_batch(
        query_lens, seq_lens, NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim, block_size, dtype, "cuda"
    )
    meta, cache = batch.meta, batch.layer_cache
    args = (
        batch.q,
        cache[0],
        cache[1],
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        head_dim**-0.5,
    )
    out = poisoned_like(batch.q)
    paged_prefill_attention(
        *args, first_seq=2, num_seqs=len(seq_lens) - 2, max_query_len=max(query_lens), out=out
    )
    ref = paged_prefill_attention_ref(*args, first_seq=2, num_seqs=len(seq_lens) - 2)
    assert torch.isnan(out[:2]).all(), "decode rows must be left alone"
    assert relative_error(out[2:], ref[2:]) < TOLERANCE[dtype]
    for seq in range(2, len(seq_lens)):
        rows = slice(int(meta.query_start_loc[seq]), int(meta.query_start_loc[seq + 1]))
        assert relative_error(out[rows], ref[rows]) < TOLERANCE[dtype], f"{seq=}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 5120])
@pytest.mark.parametrize("num_tokens", [1, 7, 2048])
def test_rms_norm(dtype: torch.dtype, hidden: int, num_tokens: int) -> None:
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    assert relative_error(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5)) < 4e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096])
@pytest.mark.parametrize("num_tokens", [1, 300])
def test_fused_add_rms_norm(dtype: torch.dtype, hidden: int, num_tokens: int) -> None:
    x, residual = (torch.randn(num_tokens, hidden, device="cuda", dtype=dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    residual_ref = residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    ref, _ = fused_add_rms_norm_ref(x, residual_ref, weight, 1e-6)
    assert new_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, residual_ref)
    assert relative_error(out, ref) < 4e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (16, 16, 64)]
)
def test_rotary_on_fused_qkv_views(
    dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    num_tokens = 333
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device="cuda", dtype=dtype)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim :].clone()
    q_ref, k_ref = q.clone(), k.clone()
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    cache = build_cos_sin_cache(8192, head_dim, 500000.0, device="cuda")
    apply_rotary(q, k, positions, cache)
    apply_rotary_ref(q_ref, k_ref, positions, cache)
    assert relative_error(q, q_ref) < 4e-3 and relative_error(k, k_ref) < 4e-3
    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (12, 3, 64), (16, 16, 64)]
)
@pytest.mark.parametrize("block_size", [16, 64])
def test_rotary_store_kv_matches_rotary_then_store(
    dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    """One launch = apply_rotary_ref on q and k, then store_kv_ref; q in place, k untouched, padding skipped."""
    batch = make_paged_batch(
        [1, 1, 70, 5], [1, 90, 70, 300], num_q_heads, num_kv_heads, head_dim, block_size, dtype, "cuda", 3
    )
    num_tokens = batch.q.shape[0]
    qkv = torch.cat([t.flatten(1) for t in (batch.q, batch.k, batch.v)], dim=1)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    k_before, q_ref = k.clone(), q.clone()
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    table = build_cos_sin_cache(8192, head_dim, 500000.0, device="cuda")
    cache, ref = batch.layer_cache.clone(), batch.layer_cache.clone()
    slots = batch.meta.slot_mapping
    rotary_store_kv(q, k, v, cache[0], cache[1], slots, positions, table)
    rotary_store_kv_ref(q_ref, k.clone(), v, ref[0], ref[1], slots, positions, table)
    assert relative_error(q, q_ref) < 4e-3 and torch.equal(k, k_before)
    flat, flat_ref = cache.flatten(1, 2), ref.flatten(1, 2)
    written = slots[slots >= 0]
    assert relative_error(flat[:, written], flat_ref[:, written]) < 4e-3
    assert torch.equal(flat[1][written], flat_ref[1][written])  # v is copied, not rounded
    kept = torch.ones(flat.shape[1], dtype=torch.bool, device="cuda")
    kept[written] = False
    assert torch.equal(flat[:, kept], batch.layer_cache.flatten(1, 2)[:, kept])


def test_rotary_reference_matches_hf_llama() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=10000.0)
    rotary = modeling_llama.LlamaRotaryEmbedding(config, device="cuda")
    q, k = torch.randn(1, 4, 50, 64, device="cuda"), torch.randn(1, 2, 50, 64, device="cuda")
    positions = torch.arange(50, device="cuda")[None]
    cos, sin = rotary(q, positions)
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_ours, k_ours = q[0].transpose(0, 1).clone(), k[0].transpose(0, 1).clone()
    apply_rotary_ref(q_ours, k_ours, positions[0], build_cos_sin_cache(64, 64, 10000.0, device="cuda"))
    assert relative_error(q_ours, q_hf[0].transpose(0, 1)) < 1e-5
    assert relative_error(k_ours, k_hf[0].transpose(0, 1)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 14336), (77, 1536), (1024, 14336)])
def test_silu_and_mul(dtype: torch.dtype, num_tokens: int, intermediate: int) -> None:
    x = torch.randn(num_tokens, 2 * intermediate, device="cuda", dtype=dtype)
    assert relative_error(silu_and_mul(x), silu_and_mul_ref(x)) < 4e-3
