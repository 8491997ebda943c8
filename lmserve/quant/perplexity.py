"""Perplexity over held-out text with a sliding window (HF's recipe), for any causal LM module."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""token ids [batch, length] -> logits [batch, length, vocab]."""


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    num_scored_tokens: int
    num_tokens: int
    window: int
    stride: int

    def summary(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} over {self.num_scored_tokens} scored tokens "
            f"({self.num_tokens} tokens, window {self.window}, stride {self.stride})"
        )


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; no token is scored twice.

    As in HF's recipe a window's first token has no context inside it, so with stride == window
    it goes unscored; num_scored_tokens reports what was counted.
    """
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window; got {window=}, {stride=}")
    spans, scored_until = [], 1  # token 0 has no context and is never scored
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + window, num_tokens)
        if end <= scored_until:
            break
        spans.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
    return spans


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn, tokens: torch.Tensor, window: int = 512, stride: int = 512
) -> PerplexityResult:
    """exp(mean negative log-likelihood) of tokens[1:] predicted left to right."""
    total_nll, count = 0.0, 0
    spans = window_spans(len(tokens), window, stride)
    for begin, end, first_scored in tqdm(spans, desc="perplexity", unit=" window", leave=False, disable=None):
        ids = tokens[begin:end].unsqueeze(0)
        logits = logits_fn(ids)[0].float()
        predictions = logits[first_scored - begin - 1 : end - begin - 1]
        targets = tokens[first_scored:end]
        total_nll += float(F.cross_entropy(predictions, targets, reduction="sum"))
        count += len(targets)
    return PerplexityResult(math.exp(total_nll / count), count, len(tokens), window, stride)
