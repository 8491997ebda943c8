"""Token embedding, vocabulary-parallel under tp: each rank holds a run of rows of the padded vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.parallel_state import all_reduce, tp_rank, tp_size
from lmserve.distributed.sharding import padded_vocab_size, vocab_rows


class VocabEmbedding(nn.Module):
    """Token id -> row of the embedding table (uninitialized until load_weights).

    Under tp each rank holds rows first_row:stop_row of the vocabulary padded to a multiple of tp; a rank
    looks up the ids it holds, zeros the others, and one all-reduce sums the ranks' rows.
    """

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp_size()
        self.first_row, self.stop_row = vocab_rows(vocab_size, tp_rank(), self.tp)
        num_rows = padded_vocab_size(vocab_size, self.tp) // self.tp
        self.weight = nn.Parameter(torch.empty(num_rows, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.first_row
        elsewhere = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        rows = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
        return all_reduce(rows.masked_fill_(elsewhere.unsqueeze(-1), 0))
