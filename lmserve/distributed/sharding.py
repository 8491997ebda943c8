"""How a model's tensors split across tp ranks: attention heads, KV heads (replicated when fewer than tp),
vocabulary rows (padded to a multiple of tp), and the slice of a checkpoint tensor each rank loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorSlice:
    """Rows start:stop of dimension `dim` of a checkpoint tensor: what this rank keeps."""

    dim: int
    start: int
    stop: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This slice of a whole tensor (a view)."""
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


def part(
    shape: tuple[int, ...] | list[int], dim: int, index: int, count: int, num_parts: int, name: str
) -> TensorSlice:
    """Parts index .. index + count - 1 of `num_parts` equal parts along dim."""
    size = shape[dim]
    if size % num_parts:
        raise ValueError(
            f"{name}: dimension {dim} of size {size} does not split into {num_parts} equal parts"
        )
    step = size // num_parts
    return TensorSlice(dim, index * step, (index + count) * step)


@dataclass(frozen=True)
class HeadLayout:
    """This rank's attention heads: a contiguous run of query heads and of KV heads."""

    num_heads: int
    """Query heads on this rank."""
    num_kv_heads: int
    """KV heads on this rank (1 when the model has fewer KV heads than tp: each is replicated)."""
    first_kv_head: int
    """The model's index of this rank's first KV head."""


def check_tp(tp: int, num_heads: int, num_kv_heads: int) -> None:
    """ValueError naming --tp when the heads cannot be split over tp ranks."""
    if num_heads % tp:
        raise ValueError(f"--tp {tp} must divide num_attention_heads={num_heads}")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(
            f"--tp {tp} and num_key_value_heads={num_kv_heads}: one must divide the other "
            "(KV heads are split, or replicated when fewer than tp)"
        )


def check_expert_split(tp: int, intermediate_size: int) -> None:
    """ValueError naming --tp when each expert's intermediate features do not split over tp ranks."""
    if intermediate_size % tp:
        raise ValueError(
            f"--tp {tp} must divide the experts' intermediate size {intermediate_size} "
            "(Mixtral: intermediate_size, Qwen3-MoE: moe_intermediate_size)"
        )


def head_layout(num_heads: int, num_kv_heads: int, rank: int, tp: int) -> HeadLayout:
    check_tp(tp, num_heads, num_kv_heads)
    if num_kv_heads >= tp:
        local_kv = num_kv_heads // tp
        return HeadLayout(num_heads // tp, local_kv, rank * local_kv)
    ranks_per_kv_head = tp // num_kv_heads
    return HeadLayout(num_heads // tp, 1, rank // ranks_per_kv_head)


def num_local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads each rank caches."""
    return max(1, num_kv_heads // tp)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so every rank holds the same number of rows."""
    return -(-vocab_size // tp) * tp


def vocab_rows(vocab_size: int, rank: int, tp: int) -> tuple[int, int]:
    """(first, stop) of this rank's rows of the padded vocabulary; rows >= vocab_size are padding."""
    per_rank = padded_vocab_size(vocab_size, tp) // tp
    return rank * per_rank, (rank + 1) * per_rank
