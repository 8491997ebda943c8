"""Mixture-of-experts block: a float32 top-k router and stacked experts (Triton grouped GEMM on CUDA, a loop on CPU).

Under tp every rank routes every token (the router is replicated) and holds 1/tp of each expert's intermediate
features (gate_up column-, down row-parallel, as Megatron and vLLM shard experts): the ranks' partial outputs
meet in one all-reduce per layer, as a dense MLP's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.parallel_state import all_reduce, tp_size
from lmserve.distributed.sharding import check_expert_split
from lmserve.kernels._triton import HAS_TRITON
from lmserve.layers.activation import silu_and_mul


class TopKRouter(nn.Module):
    """Router logits in float32, softmax over all experts, the top k; renormalized over them when asked.

    Mixtral renormalizes always; Qwen3-MoE when its config says `norm_topk_prob`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.top_k, self.renormalize = top_k, renormalize
        # float32 storage: a handful of rows, and routing decisions flip on bf16 rounding of the logits
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights float32 [T, k], expert ids int64 [T, k])."""
        logits = F.linear(x.float(), self.weight.float())
        if self.renormalize:  # softmax over all, top-k, rescale to sum 1 == softmax over the top-k logits
            top_logits, ids = logits.topk(self.top_k, dim=-1)
            return top_logits.softmax(dim=-1), ids
        weights, ids = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        return weights, ids


class StackedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj [E, 2I, H] ([gate; up] per expert), down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False
        )

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and HAS_TRITON:
            from lmserve.kernels.fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return expert_loop(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


def expert_loop(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The CPU path: for each expert that some token chose, gather its tokens, two matmuls, add back weighted."""
    top_k = topk_ids.shape[1]
    rows = topk_ids.flatten()
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=gate_up_proj.shape[0]).tolist()
    flat_weights = topk_weights.flatten()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        expert_rows = order[start : start + count]
        start += count
        tokens = expert_rows // top_k
        hidden = silu_and_mul(F.linear(x.index_select(0, tokens), gate_up_proj[expert]))
        expert_out = F.linear(hidden, down_proj[expert]).float() * flat_weights[expert_rows, None]
        out.index_add_(0, tokens, expert_out)
    return out.to(x.dtype)


def local_intermediate_size(intermediate_size: int) -> int:
    """Each expert's intermediate features on this tp rank; ValueError naming --tp when they do not split."""
    check_expert_split(tp_size(), intermediate_size)
    return intermediate_size // tp_size()


class SparseMoeBlock(nn.Module):
    """`mlp` of an MoE decoder layer (HF names: mlp.gate.weight, mlp.experts.gate_up_proj / down_proj).

    `intermediate_size` is the model's (each expert's, whole); the experts hold this rank's part of it.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
    ) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize)
        self.experts = StackedExperts(num_experts, hidden_size, local_intermediate_size(intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        return all_reduce(self.experts(x, topk_weights, topk_ids))
