"""build_step_batch against hand-computed tensors, the static decode-graph inputs' padding, the backend's lifecycle."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.attention.backend import DecodeGraphInputs
from lmserve.attention.kv_quant import TorchQuantKVBackend
from lmserve.attention.metadata import AttentionMetadata, SequenceChunk, build_step_batch
from lmserve.attention.torch_backend import TorchAttentionBackend

CPU = torch.device("cpu")


class MetadataPlanBackend(TorchAttentionBackend):
    """A graph-safe backend as the Triton ones are (plan = metadata), without needing Triton here."""

    supports_cuda_graphs = True

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:  # type: ignore[override]
        return meta


def mixed_batch():  # type: ignore[no-untyped-def]
    # block size 4: a decode at position 5 (block 1 of [7, 3] -> slot 3 * 4 + 1), a decode at position 0,
    # then a prefill chunk of 3 tokens at positions 2..4 that crosses from block 9 into block 2
    chunks = [
        SequenceChunk([11], 5, [7, 3]),
        SequenceChunk([12], 0, [5], samples=False),
        SequenceChunk([13, 14, 15], 2, [9, 2]),
    ]
    return build_step_batch(chunks, 4, CPU)


def test_flat_tensors_match_the_hand_computed_layout() -> None:
    batch = mixed_batch()
    meta = batch.metadata
    assert batch.input_ids.tolist() == [11, 12, 13, 14, 15]
    assert batch.positions.tolist() == [5, 0, 2, 3, 4]
    assert meta.slot_mapping.tolist() == [13, 20, 38, 39, 8]
    assert batch.logits_indices.tolist() == [0, 4]  # the second sequence does not sample
    assert meta.query_start_loc.tolist() == [0, 1, 2, 5]
    assert meta.seq_lens.tolist() == [6, 1, 5]
    assert meta.block_tables.tolist() == [[7, 3], [5, 0], [9, 2]]
    dtypes = (batch.input_ids.dtype, meta.slot_mapping.dtype, meta.seq_lens.dtype, meta.block_tables.dtype)
    assert dtypes == (torch.int64, torch.int64, torch.int32, torch.int32)


def test_host_facts() -> None:
    meta = mixed_batch().metadata
    assert (meta.num_seqs, meta.num_tokens, meta.num_decodes) == (3, 5, 2)
    assert (meta.max_query_len, meta.max_seq_len) == (3, 6)
    assert (meta.query_lens_cpu, meta.seq_lens_cpu) == ([1, 1, 3], [6, 1, 5])
    assert not meta.is_decode_only


def test_a_one_token_chunk_after_a_prefill_is_not_a_decode() -> None:
    chunks = [SequenceChunk([1, 2], 0, [0]), SequenceChunk([3], 4, [1, 2])]
    assert build_step_batch(chunks, 4, CPU).metadata.num_decodes == 0


def test_graph_inputs_pad_with_empty_sequences() -> None:
    inputs = MetadataPlanBackend().graph_inputs(4, 3, 4, CPU)
    decodes = [SequenceChunk([1], 5, [7, 3]), SequenceChunk([2], 0, [5])]
    inputs.load(build_step_batch(decodes, 4, CPU).metadata, batch_size=4)
    meta = inputs.plan(4)
    assert meta.slot_mapping.tolist() == [13, 20, -1, -1]
    assert meta.seq_lens.tolist() == [6, 1, 0, 0]
    assert meta.block_tables[:2].tolist() == [[7, 3, 0], [5, 0, 0]]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert (meta.num_seqs, meta.num_decodes, meta.max_query_len) == (4, 4, 1)
    assert meta.query_lens_cpu is None and meta.seq_lens_cpu is None  # a replay cannot know them


def test_graph_inputs_clear_the_padding_a_bigger_batch_left() -> None:
    inputs = DecodeGraphInputs(MetadataPlanBackend(), 4, 2, 4, CPU)
    four = [SequenceChunk([i], 1, [i]) for i in range(4)]
    inputs.load(build_step_batch(four, 4, CPU).metadata, batch_size=4)
    inputs.load(build_step_batch(four[:1], 4, CPU).metadata, batch_size=2)
    assert inputs.slot_mapping[:2].tolist() == [1, -1] and inputs.seq_lens[:2].tolist() == [2, 0]


@pytest.mark.parametrize("backend", [TorchAttentionBackend(), TorchQuantKVBackend(8)])
def test_backends_that_read_host_lengths_refuse_cuda_graphs(backend) -> None:  # type: ignore[no-untyped-def]
    assert not backend.supports_cuda_graphs
    with pytest.raises(TypeError, match="cannot run under CUDA graphs"):
        backend.graph_inputs(4, 3, 4, CPU)


def test_torch_plan_keeps_only_rows_with_a_slot() -> None:
    meta = mixed_batch().metadata
    assert TorchAttentionBackend().prepare(meta).kept_rows is None
    padding = torch.tensor([-1, -1])
    padded_meta = dataclasses.replace(meta, slot_mapping=torch.cat([meta.slot_mapping, padding]))
    padded = TorchAttentionBackend().prepare(padded_meta)
    assert padded.kept_rows is not None and padded.kept_rows.tolist() == [0, 1, 2, 3, 4]
