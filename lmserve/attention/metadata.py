"""The per-step batch: per-sequence facts in, flat ragged tensors out (StepBatch, AttentionMetadata), built once."""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Any, NamedTuple

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """A batch of sequences flattened into one token dimension.

    Sequences are ordered decodes first, then prefill chunks. For sequence i, its new
    tokens are rows query_start_loc[i]:query_start_loc[i+1] of q/k/v; they sit at
    positions seq_lens[i] - query_len_i .. seq_lens[i] - 1 of the sequence, and attend
    causally to every earlier token of the sequence (already in the cache or new).
    """

    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat cache slot (block_id * block_size + offset) for each new token's K/V; -1 = padding, not written."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32: cumulative new-token counts."""
    seq_lens: torch.Tensor
    """[num_seqs] int32: context length of each sequence after this step (cached + new)."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks_per_seq] int32: physical block ids of each sequence, padded with 0."""
    block_size: int
    num_seqs: int
    num_tokens: int
    """Rows that belong to a sequence; q/k/v may have more (padding rows, slot -1) after them."""
    num_decodes: int
    """The first num_decodes sequences have exactly one new token each."""
    max_query_len: int
    max_seq_len: int
    """At least every seq_len: exact in an eager step, the block-table capacity under a CUDA graph."""
    query_lens_cpu: list[int] | None
    """Host copies of the lengths; None under a CUDA graph, whose replays reuse one capture for any
    lengths. Backends that read them (the torch ones) set supports_cuda_graphs False."""
    seq_lens_cpu: list[int] | None

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs

    def host_lens(self) -> tuple[list[int], list[int]]:
        """(query_lens_cpu, seq_lens_cpu) for a backend that needs them: never under a CUDA graph."""
        assert self.query_lens_cpu is not None and self.seq_lens_cpu is not None, "no host lengths here"
        return self.query_lens_cpu, self.seq_lens_cpu


class SequenceChunk(NamedTuple):
    """One sequence's part of a step: new tokens at positions start .. start + len(token_ids) - 1.

    A named tuple, not a frozen dataclass: the engine makes one per running sequence every step, and a
    tuple is built in a fraction of a frozen dataclass's time (256 a step at full batch)."""

    token_ids: Sequence[int]
    start: int
    """Tokens already in the cache (the position of the first new token)."""
    block_table: Sequence[int]
    """Physical blocks of the sequence, enough for start + len(token_ids) tokens."""
    samples: bool = True
    """Whether the logits of the last new token are wanted (a token is sampled)."""


@dataclass(frozen=True)
class StepBatch:
    """What one forward pass reads: flat token tensors, the rows to compute logits for, attention metadata."""

    input_ids: torch.Tensor
    """[num_tokens] int64."""
    positions: torch.Tensor
    """[num_tokens] int64."""
    logits_indices: torch.Tensor
    """[num_sampling] int64: row of the last new token of each sequence that samples."""
    metadata: AttentionMetadata


def build_step_batch(
    chunks: Sequence[SequenceChunk], block_size: int, device: torch.device | str
) -> StepBatch:
    """The one place a step's flat tensors are made; pass decodes (one new token) first.

    Everything is laid out in two host lists (int64: ids, positions, slots, logits rows; int32: query starts,
    seq lens, block tables) packed into one host buffer and uploaded in one copy, from pinned memory without
    blocking on CUDA. A batch of decodes only (most steps) is laid out by comprehensions, no per-token range.
    """
    query_lens = [len(chunk.token_ids) for chunk in chunks]
    if max(query_lens) == 1:  # decodes only (most steps): one comprehension per list
        input_ids = [chunk.token_ids[0] for chunk in chunks]
        positions = [chunk.start for chunk in chunks]
        seq_lens = [start + 1 for start in positions]
        slots = [
            table[start // block_size] * block_size + start % block_size for _, start, table, _ in chunks
        ]
        logits_indices = [row for row, chunk in enumerate(chunks) if chunk.samples]
    else:
        input_ids, positions, slots, logits_indices, seq_lens = [], [], [], [], []
        for token_ids, start, table, samples in chunks:
            end = start + len(token_ids)
            seq_lens.append(end)
            input_ids.extend(token_ids)
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            if samples:
                logits_indices.append(len(input_ids) - 1)
    num_tokens = len(input_ids)
    longs = input_ids + positions + slots + logits_indices
    # int32 arrays (the engine's `Request.block_table_ints`) are joined as they are, lists converted first
    tables = [
        table if isinstance(table, array) and table.typecode == "i" else array("i", table)
        for table in (chunk.block_table for chunk in chunks)
    ]
    widths = [len(table) for table in tables]
    width = max(widths)
    # struct.pack converts a list of ints several times faster than array() or torch.tensor()
    long_bytes = struct.pack(f"{len(longs)}q", *longs)
    heads = [0, *accumulate(query_lens), *seq_lens]
    int_parts: list[Any] = [struct.pack(f"{len(heads)}i", *heads)]  # buffers: bytes and int32 arrays
    if min(widths) == width:  # one length (a batch of like requests): no padding
        int_parts += tables
    else:
        zeros = bytes(4 * width)
        pads = [zeros[: 4 * (width - table_width)] for table_width in widths]
        int_parts += chain.from_iterable(zip(tables, pads, strict=True))
    long_tensor, int_tensor = _upload_packed(long_bytes, b"".join(int_parts), device)
    num_seqs = len(chunks)
    metadata = AttentionMetadata(
        slot_mapping=long_tensor[2 * num_tokens : 3 * num_tokens],
        query_start_loc=int_tensor[: num_seqs + 1],
        seq_lens=int_tensor[num_seqs + 1 : 2 * num_seqs + 1],
        block_tables=int_tensor[2 * num_seqs + 1 :].view(num_seqs, width),
        block_size=block_size,
        num_seqs=num_seqs,
        num_tokens=num_tokens,
        num_decodes=num_tokens if num_tokens == num_seqs else _num_leading_ones(query_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return StepBatch(
        input_ids=long_tensor[:num_tokens],
        positions=long_tensor[num_tokens : 2 * num_tokens],
        logits_indices=long_tensor[3 * num_tokens :],
        metadata=metadata,
    )


def upload(values: list[Any], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list on the device without blocking the host: through pinned memory on CUDA."""
    if torch.device(device).type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _upload_packed(
    long_bytes: bytes, int_bytes: bytes, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64, int32) tensors on the device from one host buffer, one copy: the int64 part first keeps both
    aligned. One copy a step instead of two saves a launch on the host and a DMA on the device."""
    split = len(long_bytes)
    on_cpu = torch.device(device).type == "cpu"
    host = torch.empty(split + len(int_bytes), dtype=torch.uint8, pin_memory=not on_cpu)
    view = host.numpy().data  # written in place: no second host copy
    view[:split] = long_bytes
    view[split:] = int_bytes
    if not on_cpu:
        host = host.to(device, non_blocking=True)
    return host[:split].view(torch.int64), host[split:].view(torch.int32)


def _num_leading_ones(query_lens: list[int]) -> int:
    """Decodes come first; a later one-token chunk (after a prefill) is attended as a prefill."""
    count = 0
    while count < len(query_lens) and query_lens[count] == 1:
        count += 1
    return count
