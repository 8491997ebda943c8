"""TritonAttentionBackend against the torch reference backend on mixed batches, without host syncs, in CUDA graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.attention.triton_backend import TritonAttentionBackend
from lmserve.kernels.testing import TOLERANCE, PagedBatch, backend_step, make_paged_batch, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (query_lens, seq_lens): decodes first, then prefill chunks; a chunk shorter than its sequence is a prefix hit
# or a later chunk of a chunked prefill.
BATCHES = {
    "mixed": ([1, 1, 1, 100, 64, 7], [5, 1, 2048, 612, 64, 4000]),
    "decode_only": ([1] * 6, [1, 2, 33, 700, 2049, 4096]),
    "prefill_only": ([512, 3, 1000], [512, 40, 3000]),
}
HEAD_LAYOUTS = {  # (num_q_heads, num_kv_heads, head_dim)
    "llama3_8b": (32, 8, 128),
    "smollm2": (9, 3, 64),
    "mha": (4, 4, 128),
}


def reference(batch: PagedBatch, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend's output for the real tokens, and the cache it leaves.

    Padding rows are cut off first: the torch backend's decode-only path rejects them (see the helper report).
    """
    cache, rows = batch.layer_cache.clone(), batch.meta.num_tokens
    meta = dataclasses.replace(batch.meta, slot_mapping=batch.meta.slot_mapping[:rows])
    out = backend_step(
        TorchAttentionBackend(), batch.q[:rows], batch.k[:rows], batch.v[:rows], cache, meta, scale
    )
    return out, cache


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("name", list(BATCHES))
def test_matches_torch_backend(dtype: torch.dtype, block_size: int, layout: str, name: str) -> None:
    num_q_heads, num_kv_heads, head_dim = HEAD_LAYOUTS[layout]
    query_lens, seq_lens = BATCHES[name]
    batch = make_paged_batch(
        query_lens,
        seq_lens,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        "cuda",
        num_padding_tokens=3,
    )
    scale = head_dim**-0.5
    ref, ref_cache = reference(batch, scale)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the Triton path must never wait on the GPU
    try:
        out = backend_step(
            TritonAttentionBackend(), batch.q, batch.k, batch.v, batch.layer_cache, batch.meta, scale
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = batch.meta.num_tokens
    assert relative_error(out[:rows], ref[:rows]) < TOLERANCE[dtype]
    assert torch.equal(batch.layer_cache, ref_cache)


def test_allocates_the_reference_layout() -> None:
    args = (3, 10, 16, 8, 128, torch.bfloat16, torch.device("cuda"))
    ours, theirs = (
        TritonAttentionBackend().allocate_kv_cache(*args),
        TorchAttentionBackend().allocate_kv_cache(*args),
    )
    assert len(ours) == 3 and all(
        a.shape == b.shape and a.dtype == b.dtype for a, b in zip(ours, theirs, strict=True)
    )


@pytest.mark.parametrize("block_size", [16, 64])
def test_decode_in_cuda_graph_replays_with_new_lengths(block_size: int) -> None:
    """Captured once, replayed after the metadata tensors change in place: same result as eager."""
    seq_lens = [3, 200, 1500, 4096, 17, 64, 65, 1000]
    batch = make_paged_batch([1] * len(seq_lens), seq_lens, 32, 8, 128, block_size, torch.bfloat16, "cuda")
    meta, backend, scale = batch.meta, TritonAttentionBackend(), 128**-0.5
    plan = backend.prepare(meta)
    expected, expected_cache = reference(batch, scale)
    true_seq_lens, true_q = meta.seq_lens.clone(), batch.q.clone()
    cache = batch.layer_cache.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        backend.forward(batch.q, batch.k, batch.v, cache.clone(), plan, scale)
    torch.cuda.current_stream().wait_stream(side)
    meta.seq_lens.fill_(1)
    batch.q.normal_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(batch.q, batch.k, batch.v, cache, plan, scale)
    meta.seq_lens.copy_(true_seq_lens)
    batch.q.copy_(true_q)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, expected) < TOLERANCE[torch.bfloat16]
    assert torch.equal(cache, expected_cache)
