"""Pooling a prompt's last hidden states into one embedding (last token, mean or first token), chunk by chunk."""

from __future__ import annotations

import torch


def pool_chunk(
    pooling: str, state: torch.Tensor | None, hidden: torch.Tensor, start: int, reaches_end: bool
) -> torch.Tensor | None:
    """Fold one prefill chunk's hidden states [n, H] (positions start..) into the running state, in float32.

    A chunked prefill calls this once per chunk; a chunk at position 0 starts over (preemption recomputes).
    The types are config.POOLING_TYPES: `last` keeps the final token, `cls` the token at position 0, `mean` the running sum.
    """
    if start == 0:
        state = None
    if pooling == "last":
        return hidden[-1].float() if reaches_end else None
    if pooling == "cls":
        return hidden[0].float() if start == 0 else state
    chunk_sum = hidden.float().sum(dim=0)
    return chunk_sum if state is None else state + chunk_sum


def finish_pooling(pooling: str, state: torch.Tensor, num_tokens: int) -> list[float]:
    """The L2-normalized embedding of a prompt of num_tokens tokens whose chunks were all pooled."""
    vector = state / num_tokens if pooling == "mean" else state
    return torch.nn.functional.normalize(vector, dim=0).tolist()  # type: ignore[no-any-return]
