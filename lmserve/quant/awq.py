"""AWQ for one decoder layer: activation-aware scales (fixed ratio, or grid search), weight clipping.

Scales s (one per input channel) move quantization difficulty from weights to activations:
W x = (W diag(s)) (diag(s)^-1 x), and diag(s)^-1 folds into the previous op (an RMSNorm or a linear).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.quant.rtn import fake_quantize

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_SAMPLE_TOKENS = 512
# The ratio search scores each candidate on a sample of the calibration tokens (the scales themselves
# come from all of them): choosing one of 20 ratios needs far fewer tokens than the statistics do.
SEARCH_SAMPLE_TOKENS = 1024
SKIP_CLIP = ("q_proj", "k_proj")  # AutoAWQ: clipping q/k hurts the softmax more than it helps


@dataclass(frozen=True)
class QuantSpec:
    w_bits: int
    group_size: int
    symmetric: bool

    def fake(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.w_bits, self.group_size, self.symmetric)


@dataclass
class ScaleGroup:
    """Linears that read one input, the op producing that input, and the block whose output we score."""

    prev_op: Any
    linears: list[str]
    input_name: str
    inspect: Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]]
    """(sampled inputs, the batch index of each) -> block outputs."""
    per_token: bool = True
    """The block treats tokens independently, so any rows may be sampled (attention needs whole sequences)."""


def llama_scale_groups(layer: Any, kwargs: list[dict]) -> list[ScaleGroup]:
    """AutoAWQ's groups for a Llama-family decoder layer (HF module names)."""
    attn, mlp = layer.self_attn, layer.mlp

    def run_attention(inputs: list[torch.Tensor], batch_ids: list[int]) -> list[torch.Tensor]:
        return [
            attn(hidden_states=x, **_attention_kwargs(kwargs[i]))[0]
            for x, i in zip(inputs, batch_ids, strict=True)
        ]

    groups = [
        ScaleGroup(
            layer.input_layernorm,
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "self_attn.q_proj",
            run_attention,
            per_token=False,
        )
    ]
    # v -> o only when shapes match; with grouped-query attention one v channel feeds several heads.
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(
            ScaleGroup(attn.v_proj, ["self_attn.o_proj"], "self_attn.o_proj", _per_batch(attn.o_proj))
        )
    groups.append(
        ScaleGroup(
            layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_proj", _per_batch(mlp)
        )
    )
    groups.append(ScaleGroup(mlp.up_proj, ["mlp.down_proj"], "mlp.down_proj", _per_batch(mlp.down_proj)))
    return groups


def _attention_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("attention_mask", "position_embeddings", "position_ids") if k in kwargs}


def _per_batch(module: Any) -> Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]]:
    return lambda inputs, _batch_ids: [module(x) for x in inputs]


def sample_inputs(
    inputs: list[torch.Tensor], per_token: bool, num_tokens: int = SEARCH_SAMPLE_TOKENS
) -> tuple[list[torch.Tensor], list[int]]:
    """About num_tokens of the inputs, spread evenly: strided rows, or whole batches when per_token is False."""
    if per_token:
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        step = max(1, -(-len(rows) // num_tokens))
        return [rows[::step].unsqueeze(0)], [0]
    sizes = [x.shape[:-1].numel() for x in inputs]
    num_batches = max(1, min(len(inputs), num_tokens // max(sizes)))
    batch_ids = sorted({round(i * (len(inputs) - 1) / max(1, num_batches - 1)) for i in range(num_batches)})
    return [inputs[i] for i in batch_ids], batch_ids


def weight_channel_mean(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over outputs of |w| normalized by its group's max: how large each input channel's weights are."""
    grouped = weight.abs().reshape(-1, group_size)
    normalized = grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)
    return normalized.reshape(weight.shape).mean(dim=0)


def ratio_scales(act_scale: torch.Tensor, weight_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """s = act^ratio / w^(1 - ratio), normalized so max(s) * min(s) = 1 (AutoAWQ, LMDeploy)."""
    scales = (act_scale.float().pow(ratio) / (weight_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


@torch.no_grad()
def apply_scales(prev_op: Any, linears: list[Any], scales: torch.Tensor) -> None:
    """Fold diag(s)^-1 into prev_op's output and diag(s) into each linear's input columns."""
    scales = scales.to(linears[0].weight.device)
    if isinstance(prev_op, nn.Linear):
        prev_op.weight.div_(scales.view(-1, 1).to(prev_op.weight.dtype))
        if prev_op.bias is not None:
            prev_op.bias.div_(scales.to(prev_op.bias.dtype))
    else:  # RMSNorm: y = weight * normalized(x)
        prev_op.weight.div_(scales.to(prev_op.weight.dtype))
    for linear in linears:
        linear.weight.mul_(scales.view(1, -1).to(linear.weight.dtype))


@torch.no_grad()
def search_scales(group: ScaleGroup, layer: Any, inputs: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Grid search over the ratio (AutoAWQ with duo scaling); candidate 1 keeps plain RTN in the running."""
    linears = [layer.get_submodule(name) for name in group.linears]
    originals = [linear.weight.detach().clone() for linear in linears]
    act_mean = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).abs().float().mean(dim=0)
    weight_mean = weight_channel_mean(torch.cat(originals), spec.group_size)
    sampled, batch_ids = sample_inputs(inputs, group.per_token)
    reference = group.inspect(sampled, batch_ids)
    candidates = [torch.ones_like(act_mean)] + [
        ratio_scales(act_mean, weight_mean, i / N_GRID) for i in range(N_GRID)
    ]
    best_scales, best_loss = candidates[0], float("inf")
    for scales in candidates:
        for linear, original in zip(linears, originals, strict=True):
            scaled = original * scales.view(1, -1).to(original.dtype)
            linear.weight.copy_(spec.fake(scaled) / scales.view(1, -1).to(original.dtype))
        loss = _mse(reference, group.inspect(sampled, batch_ids))
        if loss < best_loss:
            best_scales, best_loss = scales, loss
    for linear, original in zip(linears, originals, strict=True):
        linear.weight.copy_(original)
    return best_scales


def _mse(reference: list[torch.Tensor], output: list[torch.Tensor]) -> float:
    total = sum(float((r.float() - o.float()).pow(2).sum()) for r, o in zip(reference, output, strict=True))
    return total / sum(r.numel() for r in reference)


@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per (output channel, group) max |w| minimizing the group's output error after quantization: [out, groups, 1].

    The error of group g over tokens X_g is mean_t (x_t . d)^2 = d^T (X_g^T X_g / n) d with d = w - q, so one
    Gram matrix per group replaces a pass over the tokens per candidate (AutoAWQ's objective, ~8x fewer flops).
    """
    out_features, in_features = weight.shape
    num_groups = in_features // spec.group_size
    step = max(1, len(inputs) // CLIP_SAMPLE_TOKENS)
    x = inputs[::step].float()
    x_groups = x.reshape(len(x), num_groups, spec.group_size).transpose(0, 1)  # [groups, tokens, g]
    gram = torch.bmm(x_groups.transpose(1, 2), x_groups) / len(x)  # [groups, g, g]
    w = weight.float().reshape(out_features, num_groups, spec.group_size)
    original_max = w.abs().amax(dim=-1, keepdim=True)
    best_max, min_error = original_max.clone(), torch.full_like(original_max, float("inf"))
    for shrink_step in range(int(MAX_SHRINK * N_GRID)):
        max_val = original_max * (1 - shrink_step / N_GRID)
        clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
        quantized = spec.fake(clipped.reshape(out_features, in_features)).reshape(w.shape)
        error = _quadratic_error(w - quantized, gram)
        better = error < min_error
        min_error[better], best_max[better] = error[better], max_val[better]
    return best_max


def _quadratic_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """d^T G d per (output channel, group): delta [out, groups, g], gram [groups, g, g] -> [out, groups, 1]."""
    projected = torch.bmm(delta.transpose(0, 1), gram)  # [groups, out, g]
    return (projected * delta.transpose(0, 1)).sum(dim=-1).t().unsqueeze(-1)


@torch.no_grad()
def apply_clip(linear: Any, max_val: torch.Tensor, group_size: int) -> None:
    out_features, in_features = linear.weight.shape
    grouped = linear.weight.reshape(out_features, in_features // group_size, group_size)
    limit = max_val.to(grouped.dtype)
    grouped.copy_(torch.maximum(torch.minimum(grouped, limit), -limit))
