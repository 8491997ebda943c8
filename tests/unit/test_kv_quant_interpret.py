"""The quantized-KV Triton kernels and backend against their torch references, run by Triton's interpreter.

As in test_kernels_interpret.py, TRITON_INTERPRET must be set before Triton is imported, so the one test
pytest runs here starts a child pytest over this file with it set; the per-kernel tests run there.
"""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.testing import in_interpreter_child, run_under_interpreter

IN_CHILD = in_interpreter_child()
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child process")


def test_kv_quant_kernels_match_references_under_interpreter() -> None:
    run_under_interpreter(__file__, timeout=600)


if IN_CHILD:
    from lmserve.attention.kv_quant import QuantizedKVCache, TorchQuantKVBackend, TritonQuantKVBackend
    from lmserve.kernels.decode_attention import paged_decode_attention_ref
    from lmserve.kernels.kv_quant import (
        paged_decode_attention_quant,
        quantize_kv_ref,
        store_quantized_kv,
        store_quantized_kv_ref,
    )
    from lmserve.kernels.kv_quant_prefill import paged_prefill_attention_quant
    from lmserve.kernels.prefill_attention import paged_prefill_attention_ref
    from lmserve.kernels.testing import PagedBatch, backend_step, make_paged_batch, relative_error

DTYPE = torch.float16  # numpy, under the interpreter, has no bfloat16


def quantized_batch(batch: PagedBatch, bits: int) -> QuantizedKVCache:
    codes, params = quantize_kv_ref(batch.layer_cache, bits)
    return QuantizedKVCache(codes, params, bits)


@child_only
@pytest.mark.parametrize("bits", [8, 4])
def test_store_matches_reference_and_skips_padding(bits: int) -> None:
    batch = make_paged_batch([1, 5], [7, 9], 4, 3, 24, 4, DTYPE, "cpu", num_padding_tokens=2)
    cache, ref = quantized_batch(batch, bits), quantized_batch(batch, bits)
    before = cache.codes.clone()
    store_quantized_kv(batch.k, batch.v, cache.codes, cache.params, batch.meta.slot_mapping, bits)
    store_quantized_kv_ref(batch.k, batch.v, ref.codes, ref.params, batch.meta.slot_mapping, bits)
    assert torch.equal(cache.params, ref.params)
    assert torch.equal(cache.codes, ref.codes) and not torch.equal(cache.codes, before)


@child_only
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_over_codes(bits: int, num_splits: int) -> None:
    batch = make_paged_batch([1, 1, 1], [1, 17, 40], 8, 2, 32, 8, DTYPE, "cpu", seed=num_splits)
    cache, meta = quantized_batch(batch, bits), batch.meta
    out = paged_decode_attention_quant(
        batch.q, cache.codes, cache.params, meta.block_tables, meta.seq_lens, 0.3, bits,
        num_splits=num_splits, block_n=16,
    )  # fmt: skip
    plain = cache.dequantize(DTYPE)
    ref = paged_decode_attention_ref(batch.q, plain[0], plain[1], meta.block_tables, meta.seq_lens, 0.3)
    assert relative_error(out, ref) < 2e-3


@child_only
@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_attention_over_codes(bits: int) -> None:
    """Chunks with and without a cached prefix, one longer than a query block, behind a decode row."""
    batch = make_paged_batch([1, 40, 5, 9], [6, 40, 37, 9], 4, 2, 32, 8, DTYPE, "cpu", seed=bits)
    cache, meta = quantized_batch(batch, bits), batch.meta
    args = (batch.q, cache.codes, cache.params, meta.block_tables, meta.seq_lens, meta.query_start_loc)
    out = paged_prefill_attention_quant(
        *args, 0.3, bits, first_seq=1, num_seqs=3, max_query_len=40, block_m=16, block_n=16
    )
    plain = cache.dequantize(DTYPE)
    ref = paged_prefill_attention_ref(
        batch.q, plain[0], plain[1], meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3,
        first_seq=1, num_seqs=3,
    )  # fmt: skip
    assert relative_error(out[1:], ref[1:]) < 2e-3


@child_only
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_backend_matches_torch_backend_on_mixed_batch(bits: int) -> None:
    batch = make_paged_batch([1, 1, 12, 5], [3, 33, 12, 21], 8, 2, 32, 16, DTYPE, "cpu", num_padding_tokens=1)
    cache, ref_cache = quantized_batch(batch, bits), quantized_batch(batch, bits)
    out = backend_step(TritonQuantKVBackend(bits), batch.q, batch.k, batch.v, cache, batch.meta, 0.25)
    ref = backend_step(TorchQuantKVBackend(bits), batch.q, batch.k, batch.v, ref_cache, batch.meta, 0.25)
    rows = batch.meta.num_tokens
    assert relative_error(out[:rows], ref[:rows]) < 2e-3
    assert torch.equal(cache.codes, ref_cache.codes) and torch.equal(cache.params, ref_cache.params)
