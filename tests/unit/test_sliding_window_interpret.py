"""The Triton attention kernels with a sliding window against their torch references, under Triton's interpreter.

As in test_kernels_interpret: the one test pytest runs here starts a child pytest over this file with
TRITON_INTERPRET=1, and the per-kernel tests run there.
"""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.testing import in_interpreter_child, run_under_interpreter

IN_CHILD = in_interpreter_child()
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child process")


def test_windowed_kernels_match_references_under_interpreter() -> None:
    run_under_interpreter(__file__, timeout=300)


if IN_CHILD:
    from lmserve.attention.torch_backend import TorchAttentionBackend
    from lmserve.attention.triton_backend import TritonAttentionBackend
    from lmserve.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
    from lmserve.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
    from lmserve.kernels.testing import backend_step, make_paged_batch, reference_forward, relative_error

DTYPE = torch.float16  # numpy, under the interpreter, has no bfloat16


@child_only
@pytest.mark.parametrize(("num_splits", "window"), [(1, 5), (3, 5), (3, 21), (2, 1)])
def test_decode_attention_window(num_splits: int, window: int) -> None:
    """Windows that start mid-block and mid-tile (block 8, tile 16), shorter and longer than some contexts."""
    batch = make_paged_batch([1, 1, 1, 1], [1, 4, 17, 40], 8, 2, 32, 8, DTYPE, "cpu", seed=window)
    meta, cache = batch.meta, batch.layer_cache
    args = (batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.3)
    out = paged_decode_attention(*args, num_splits=num_splits, sliding_window=window, block_n=16)
    ref = paged_decode_attention_ref(*args, sliding_window=window)
    assert relative_error(out, ref) < 2e-3
    assert relative_error(out, paged_decode_attention_ref(*args)) > 0.05  # the window did cut something


@child_only
@pytest.mark.parametrize("window", [1, 5, 19])
def test_prefill_attention_window_with_prefix(window: int) -> None:
    batch = make_paged_batch([1, 37, 7], [9, 37, 30], 4, 2, 32, 8, DTYPE, "cpu")
    meta, cache = batch.meta, batch.layer_cache
    args = (batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.2)
    out = torch.zeros_like(batch.q)
    paged_prefill_attention(
        *args,
        first_seq=1,
        num_seqs=2,
        max_query_len=37,
        out=out,
        sliding_window=window,
        block_m=16,
        block_n=16,
    )
    ref = paged_prefill_attention_ref(*args, first_seq=1, num_seqs=2, sliding_window=window)
    assert relative_error(out[1:], ref[1:]) < 2e-3


@child_only
@pytest.mark.parametrize("window", [3, 6])
def test_triton_backend_window_matches_torch_backend(window: int) -> None:
    """The two production backends agree on a mixed batch with padding, and with the kernel references."""
    batch = make_paged_batch([1, 1, 12, 5], [3, 33, 12, 21], 8, 2, 32, 4, DTYPE, "cpu", num_padding_tokens=1)
    ref, ref_cache = reference_forward(batch, 0.25, window)
    triton_cache, torch_cache = batch.layer_cache.clone(), batch.layer_cache.clone()
    out = backend_step(
        TritonAttentionBackend(), batch.q, batch.k, batch.v, triton_cache, batch.meta, 0.25, window
    )
    torch_out = backend_step(
        TorchAttentionBackend(), batch.q.float(), batch.k.float(), batch.v.float(), torch_cache.float(),
        batch.meta, 0.25, window,
    )  # fmt: skip
    rows = batch.meta.num_tokens
    assert relative_error(out[:rows], ref[:rows]) < 2e-3
    assert relative_error(out[:rows], torch_out[:rows]) < 2e-3
    assert torch.equal(triton_cache, ref_cache)
