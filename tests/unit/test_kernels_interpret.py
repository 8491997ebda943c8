"""Each Triton kernel against its torch reference on small shapes, run on the CPU by Triton's interpreter.

TRITON_INTERPRET must be set before Triton (and our kernel modules) are imported, so the one test that
pytest runs here starts a child pytest over this same file with it set; the per-kernel tests run there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.kernels.testing import in_interpreter_child, run_under_interpreter

IN_CHILD = in_interpreter_child()
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child process")


def test_kernels_match_references_under_interpreter() -> None:
    run_under_interpreter(__file__, timeout=300)


if IN_CHILD:
    import lmserve.kernels.decode_attention as decode_attention
    from lmserve.attention.triton_backend import TritonAttentionBackend
    from lmserve.kernels.activation import silu_and_mul, silu_and_mul_ref
    from lmserve.kernels.decode_attention import (
        NewTokenKV,
        paged_decode_attention,
        paged_decode_attention_ref,
    )
    from lmserve.kernels.kv_write import rotary_store_kv, rotary_store_kv_ref, store_kv, store_kv_ref
    from lmserve.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
    from lmserve.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
    from lmserve.kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache
    from lmserve.kernels.split_k import tile_locks
    from lmserve.kernels.testing import (
        PagedBatch,
        backend_step,
        make_paged_batch,
        reference_forward,
        relative_error,
    )
    from lmserve.layers.rotary import RopeInputs

DTYPE = torch.float16  # numpy, under the interpreter, has no bfloat16


@child_only
def test_store_kv_skips_padding() -> None:
    batch = make_paged_batch([1, 5], [7, 9], 4, 2, 16, 4, DTYPE, "cpu", num_padding_tokens=2)
    cache, ref = batch.layer_cache.clone(), batch.layer_cache.clone()
    store_kv(batch.k, batch.v, cache[0], cache[1], batch.meta.slot_mapping)
    store_kv_ref(batch.k, batch.v, ref[0], ref[1], batch.meta.slot_mapping)
    assert torch.equal(cache, ref) and not torch.equal(cache, batch.layer_cache)


@child_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention(num_splits: int) -> None:
    batch = make_paged_batch([1, 1, 1], [1, 17, 40], 8, 2, 32, 8, DTYPE, "cpu", seed=num_splits)
    meta, cache = batch.meta, batch.layer_cache
    out = paged_decode_attention(
        batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.3, num_splits=num_splits, block_n=16
    )
    ref = paged_decode_attention_ref(batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.3)
    assert relative_error(out, ref) < 2e-3


@child_only
@pytest.mark.parametrize("num_splits", [2, 3, 6])
def test_decode_attention_fused_reduce_matches_reduce_launch(num_splits: int) -> None:
    """The last split of each (sequence, KV head) combines the partials in the same launch: the output of the
    separate reduce launch (to float rounding), the reference's, and the counters left at zero for the next launch
    (a second launch over other queries is right too). The short sequence leaves splits empty."""
    batch = make_paged_batch([1, 1, 1, 1], [1, 17, 40, 64], 8, 2, 32, 8, DTYPE, "cpu", seed=num_splits)
    meta, cache = batch.meta, batch.layer_cache
    args = (cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.3)
    for q in (batch.q, torch.randn_like(batch.q.float()).to(DTYPE)):
        fused = paged_decode_attention(q, *args, num_splits=num_splits, block_n=8, fused_reduce=True)
        apart = paged_decode_attention(q, *args, num_splits=num_splits, block_n=8, fused_reduce=False)
        ref = paged_decode_attention_ref(q, *args)
        assert relative_error(fused, apart) < 1e-3 and relative_error(fused, ref) < 2e-3
        counters = tile_locks(q.device)
        assert not counters.any()


def decode_step_with_new_tokens(
    seq_lens: list[int], sliding_window: int | None = None, seed: int = 0
) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
    """A decode batch whose new tokens' keys and values are not yet in the cache (at slot_mapping), its positions
    (seq_len - 1) and a rotary table."""
    batch = make_paged_batch([1] * len(seq_lens), seq_lens, 8, 2, 32, 8, DTYPE, "cpu", seed=seed)
    positions = batch.meta.seq_lens[: len(seq_lens)].long() - 1
    return batch, positions, build_cos_sin_cache(128, 32, 10000.0)


@child_only
@pytest.mark.parametrize(
    ("num_splits", "fused_reduce", "window"), [(1, False, None), (3, False, 9), (4, True, None)]
)
def test_decode_attention_rotates_and_stores_the_new_token(
    num_splits: int, fused_reduce: bool, window: int | None
) -> None:
    """new_kv: the launch rotates q and the new key, stores key and value at their slots and attends to them from
    registers: the cache and the output of rotary_store_kv followed by the plain decode, and q left unrotated."""
    batch, positions, table = decode_step_with_new_tokens([1, 9, 40], window, seed=num_splits)
    meta = batch.meta
    q, k, v = fused_qkv_views(batch)
    q_before, k_before = q.clone(), k.clone()
    stale = batch.layer_cache.clone()  # what the new tokens' slots held: the launch must not read it
    fused_cache, ref_cache = stale.clone(), stale.clone()
    new_kv = NewTokenKV(k, v, meta.slot_mapping, positions, table)
    out = paged_decode_attention(
        q, fused_cache[0], fused_cache[1], meta.block_tables, meta.seq_lens, 0.3, num_splits=num_splits,
        sliding_window=window, block_n=8, new_kv=new_kv, fused_reduce=fused_reduce,
    )  # fmt: skip
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    q_ref = q.clone()
    rotary_store_kv(q_ref, k.clone(), v, ref_cache[0], ref_cache[1], meta.slot_mapping, positions, table)
    ref = paged_decode_attention(
        q_ref, ref_cache[0], ref_cache[1], meta.block_tables, meta.seq_lens, 0.3, num_splits=num_splits,
        sliding_window=window, block_n=8,
    )  # fmt: skip
    assert torch.equal(fused_cache, ref_cache) and not torch.equal(fused_cache, stale)
    assert relative_error(out, ref) < 1e-3
    truth = paged_decode_attention_ref(
        q_ref, ref_cache[0], ref_cache[1], meta.block_tables, meta.seq_lens, 0.3, sliding_window=window
    )
    assert relative_error(out, truth) < 2e-3


@child_only
def test_backend_fuses_rotary_into_decode_only_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the rotary fusion on, a decode-only step (padded as a graph replays it) matches rotating first."""
    monkeypatch.setattr(decode_attention, "FUSE_ROTARY", True)
    batch, positions, table = decode_step_with_new_tokens([5, 12, 30])
    rotated_q, rotated_k = batch.q.clone(), batch.k.clone()
    apply_rotary_ref(rotated_q, rotated_k, positions, table)
    ref, ref_cache = reference_forward(dataclasses.replace(batch, q=rotated_q, k=rotated_k), 0.25)
    backend = TritonAttentionBackend()
    inputs = backend.graph_inputs(4, batch.meta.block_tables.shape[1] + 2, 8, torch.device("cpu"))
    inputs.load(batch.meta, batch_size=4)
    q, k, v = (torch.cat([x, x[:1]]) for x in fused_qkv_views(batch))  # a stale padding row
    padded_positions = torch.cat([positions, positions[:1]])
    cache = batch.layer_cache.clone()
    rope = RopeInputs(padded_positions, None, None, table)
    out = backend.forward(q, k, v, cache, inputs.plan(4), 0.25, rope=rope)
    assert relative_error(out[:3], ref) < 2e-3
    assert relative_error(cache, ref_cache) < 2e-3


@child_only
@pytest.mark.parametrize("seq_lens", [[17], [5, 12, 30]])
def test_backend_fuses_rotary_into_steps_of_few_rows(
    seq_lens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE_ROTARY_ROWS = 1 with the fusion off: a one-sequence decode step rotates inside the attention launch (no
    rotary_store_kv), a three-sequence one keeps the separate store; both match rotating first."""
    from lmserve.attention import triton_backend

    monkeypatch.setattr(decode_attention, "FUSE_ROTARY", False)
    monkeypatch.setattr(decode_attention, "FUSE_ROTARY_ROWS", 1)
    stores: list[int] = []
    separate = triton_backend.rotary_store_kv

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        stores.append(1)
        return separate(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "rotary_store_kv", counted)
    batch, positions, table = decode_step_with_new_tokens(seq_lens)
    rotated_q, rotated_k = batch.q.clone(), batch.k.clone()
    apply_rotary_ref(rotated_q, rotated_k, positions, table)
    ref, ref_cache = reference_forward(dataclasses.replace(batch, q=rotated_q, k=rotated_k), 0.25)
    backend = TritonAttentionBackend()
    q, k, v = fused_qkv_views(batch)
    cache = batch.layer_cache.clone()
    out = backend.forward(
        q, k, v, cache, backend.prepare(batch.meta), 0.25, rope=RopeInputs(positions, None, None, table)
    )
    assert bool(stores) == (len(seq_lens) > 1)
    assert relative_error(out, ref) < 2e-3
    assert relative_error(cache, ref_cache) < 2e-3


@child_only
def test_prefill_attention_with_prefix() -> None:
    batch = make_paged_batch([1, 20, 7], [9, 20, 30], 4, 4, 32, 8, DTYPE, "cpu")
    meta, cache = batch.meta, batch.layer_cache
    args = (batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.2)
    out = torch.zeros_like(batch.q)
    paged_prefill_attention(*args, first_seq=1, num_seqs=2, max_query_len=20, out=out, block_m=16, block_n=16)
    ref = paged_prefill_attention_ref(*args, first_seq=1, num_seqs=2)
    assert relative_error(out, ref) < 2e-3


@child_only
def test_backend_matches_reference_on_mixed_batch() -> None:
    batch = make_paged_batch([1, 1, 12, 5], [3, 33, 12, 21], 8, 2, 32, 16, DTYPE, "cpu", num_padding_tokens=1)
    ref, ref_cache = reference_forward(batch, 0.25)
    out = backend_step(
        TritonAttentionBackend(), batch.q, batch.k, batch.v, batch.layer_cache, batch.meta, 0.25
    )
    rows = batch.meta.num_tokens
    assert relative_error(out[:rows], ref[:rows]) < 2e-3
    assert torch.equal(batch.layer_cache, ref_cache)


@child_only
def test_backend_over_padded_graph_inputs_matches_reference() -> None:
    """A decode batch of 3 loaded into static buffers for 4 (as before a graph replay): the padding
    sequence writes nothing and the real rows match the reference."""
    batch = make_paged_batch([1, 1, 1], [3, 17, 30], 8, 2, 32, 8, DTYPE, "cpu")
    ref, ref_cache = reference_forward(batch, 0.25)
    backend = TritonAttentionBackend()
    inputs = backend.graph_inputs(4, batch.meta.block_tables.shape[1] + 2, 8, torch.device("cpu"))
    inputs.load(batch.meta, batch_size=4)
    q, k, v = (torch.cat([x, x[:1]]) for x in (batch.q, batch.k, batch.v))  # a stale padding row
    out = backend.forward(q, k, v, batch.layer_cache, inputs.plan(4), 0.25)
    assert relative_error(out[:3], ref) < 2e-3
    assert torch.equal(batch.layer_cache, ref_cache)


@child_only
def test_rms_norms() -> None:
    x, residual, weight = (
        torch.randn(5, 48).to(DTYPE),
        torch.randn(5, 48).to(DTYPE),
        torch.randn(48).to(DTYPE),
    )
    assert relative_error(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6)) < 2e-3
    residual_ref = residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    ref, _ = fused_add_rms_norm_ref(x, residual_ref, weight, 1e-6)
    assert new_residual is residual and torch.equal(residual, residual_ref)
    assert relative_error(out, ref) < 2e-3


@child_only
def test_rotary_in_place_on_qkv_views() -> None:
    qkv = torch.randn(6, (4 + 2 + 2) * 16).to(DTYPE)
    q, k = qkv[:, :64].view(6, 4, 16), qkv[:, 64:96].view(6, 2, 16)
    q_ref, k_ref = q.clone(), k.clone()
    positions, cache = torch.tensor([0, 3, 9, 1, 2, 30]), build_cos_sin_cache(32, 16, 10000.0)
    apply_rotary(q, k, positions, cache)
    apply_rotary_ref(q_ref, k_ref, positions, cache)
    assert relative_error(q, q_ref) < 2e-3 and relative_error(k, k_ref) < 2e-3


def fused_qkv_views(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's q, k, v as strided views into one fused [T, (Hq + 2 Hkv) D] projection, as the model has them."""
    qkv = torch.cat([t.flatten(1) for t in (batch.q, batch.k, batch.v)], dim=1)
    q_size, kv_size = batch.q[0].numel(), batch.k[0].numel()
    views = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :]
    q, k, v = (
        t.view(-1, *like.shape[1:]) for t, like in zip(views, (batch.q, batch.k, batch.v), strict=True)
    )
    return q, k, v


@child_only
def test_rotary_store_kv_matches_rotary_then_store() -> None:
    batch = make_paged_batch([1, 5, 3], [7, 9, 3], 4, 2, 16, 4, DTYPE, "cpu", num_padding_tokens=2)
    q, k, v = fused_qkv_views(batch)
    k_before = k.clone()
    q_ref, k_ref, v_ref = q.clone(), k.clone(), v.clone()
    positions = torch.tensor([6, 4, 5, 6, 7, 8, 0, 1, 2, 0, 0])
    table = build_cos_sin_cache(16, 16, 10000.0)
    cache, ref = batch.layer_cache.clone(), batch.layer_cache.clone()
    slots = batch.meta.slot_mapping
    rotary_store_kv(q, k, v, cache[0], cache[1], slots, positions, table)
    rotary_store_kv_ref(q_ref, k_ref, v_ref, ref[0], ref[1], slots, positions, table)
    assert relative_error(q, q_ref) < 2e-3 and torch.equal(k, k_before)
    written = slots[slots >= 0]
    assert relative_error(cache.flatten(1, 2)[:, written], ref.flatten(1, 2)[:, written]) < 2e-3
    untouched = torch.ones(cache[0].shape[0] * cache[0].shape[1], dtype=torch.bool)
    untouched[written] = False  # padding rows (slot -1) wrote nothing, other slots kept their tokens
    assert torch.equal(cache.flatten(1, 2)[:, untouched], batch.layer_cache.flatten(1, 2)[:, untouched])


@child_only
@pytest.mark.parametrize("fuse_rotary", [False, True])
def test_backend_with_rope_matches_rotating_first(fuse_rotary: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed batch (decodes and a prefill): the separate rotary store runs, with the decode fusion on or off."""
    monkeypatch.setattr(decode_attention, "FUSE_ROTARY", fuse_rotary)
    batch = make_paged_batch([1, 1, 6], [5, 12, 6], 4, 2, 16, 4, DTYPE, "cpu", num_padding_tokens=1)
    q, k, v = fused_qkv_views(batch)
    positions = torch.tensor([4, 11, 0, 1, 2, 3, 4, 5, 0])
    table = build_cos_sin_cache(16, 16, 10000.0)
    rope = RopeInputs(positions, None, None, table)
    cache = batch.layer_cache.clone()
    backend = TritonAttentionBackend()
    out = backend.forward(q, k, v, cache, backend.prepare(batch.meta), 0.25, rope=rope)
    rotated_q, rotated_k = batch.q.clone(), batch.k.clone()
    apply_rotary_ref(rotated_q, rotated_k, positions, table)
    rotated = dataclasses.replace(batch, q=rotated_q, k=rotated_k)
    ref, ref_cache = reference_forward(rotated, 0.25)
    rows = batch.meta.num_tokens
    assert relative_error(out[:rows], ref[:rows]) < 2e-3
    assert relative_error(cache, ref_cache) < 2e-3


@child_only
def test_silu_and_mul() -> None:
    x = torch.randn(3, 2 * 40).to(DTYPE)
    assert relative_error(silu_and_mul(x, block=16), silu_and_mul_ref(x)) < 2e-3
