"""Rank 0 -> workers, once per engine step: the step's sequences as one packed int64 buffer behind a 3-int header.

Header [command, num_chunks, payload length]; payload: per chunk (start, num tokens, num blocks, samples),
then every chunk's tokens, then every chunk's block table. Two broadcasts over the gloo control group,
no pickles: each worker rebuilds the same StepBatch from it (build_step_batch is deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lmserve.attention.metadata import SequenceChunk

STEP, SHUTDOWN = 1, 0
FIELDS_PER_CHUNK = 4


def pack_chunks(chunks: Sequence[SequenceChunk]) -> torch.Tensor:
    """The payload of one step."""
    fields = [(c.start, len(c.token_ids), len(c.block_table), int(c.samples)) for c in chunks]
    flat: list[int] = [value for row in fields for value in row]
    for chunk in chunks:
        flat.extend(chunk.token_ids)
    for chunk in chunks:
        flat.extend(chunk.block_table)
    return torch.tensor(flat, dtype=torch.int64)


def unpack_chunks(payload: torch.Tensor, num_chunks: int) -> list[SequenceChunk]:
    values = payload.tolist()
    fields = [values[i * FIELDS_PER_CHUNK : (i + 1) * FIELDS_PER_CHUNK] for i in range(num_chunks)]
    offset = num_chunks * FIELDS_PER_CHUNK
    tokens = []
    for _, num_tokens, _, _ in fields:
        tokens.append(values[offset : offset + num_tokens])
        offset += num_tokens
    chunks = []
    for (start, _, num_blocks, samples), chunk_tokens in zip(fields, tokens, strict=True):
        chunks.append(SequenceChunk(chunk_tokens, start, values[offset : offset + num_blocks], bool(samples)))
        offset += num_blocks
    return chunks


class StepChannel:
    """Broadcasts of rank 0's steps over the tp group's control (gloo) group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def send(self, chunks: Sequence[SequenceChunk]) -> None:
        payload = pack_chunks(chunks)
        self._broadcast(torch.tensor([STEP, len(chunks), payload.numel()], dtype=torch.int64))
        self._broadcast(payload)

    def send_shutdown(self) -> None:
        self._broadcast(torch.tensor([SHUTDOWN, 0, 0], dtype=torch.int64))

    def receive(self) -> list[SequenceChunk] | None:
        """The next step's chunks (workers), or None when rank 0 shuts down."""
        header = torch.empty(3, dtype=torch.int64)
        self._broadcast(header)
        command, num_chunks, length = header.tolist()
        if command == SHUTDOWN:
            return None
        payload = torch.empty(length, dtype=torch.int64)
        self._broadcast(payload)
        return unpack_chunks(payload, num_chunks)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0, group=self.group)
