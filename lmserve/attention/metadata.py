"""AttentionMetadata: what one forward pass over a flat, ragged batch needs to read and write the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
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
    max_query_len: int
    max_seq_len: int
    num_decodes: int
    """The first num_decodes sequences have exactly one new token each."""
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs
