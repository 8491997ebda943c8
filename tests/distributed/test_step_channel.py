"""The per-step broadcast's packing: what rank 0 packs, a worker unpacks unchanged (no process group needed)."""

from __future__ import annotations

from lmserve.attention.metadata import SequenceChunk, build_step_batch
from lmserve.distributed.step_channel import pack_chunks, unpack_chunks


def test_chunks_survive_packing_and_rebuild_the_same_step_batch() -> None:
    chunks = [
        SequenceChunk([7], 12, [3, 9], True),
        SequenceChunk([1, 2, 3, 4, 5], 0, [4, 5], False),
        SequenceChunk([8, 6], 30, [0, 1, 2, 6], True),
    ]
    unpacked = unpack_chunks(pack_chunks(chunks), len(chunks))
    assert [(list(c.token_ids), c.start, list(c.block_table), c.samples) for c in unpacked] == [
        (list(c.token_ids), c.start, list(c.block_table), c.samples) for c in chunks
    ]
    ours, theirs = build_step_batch(unpacked, 16, "cpu"), build_step_batch(chunks, 16, "cpu")
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    assert ours.metadata.slot_mapping.tolist() == theirs.metadata.slot_mapping.tolist()
    assert ours.logits_indices.tolist() == theirs.logits_indices.tolist()
