"""AWQ for one decoder layer: activation-aware scales (fixed ratio, or grid search), clip ranges, GPTQ rounding.

Scales s (one per input channel) move quantization difficulty from weights to activations:
W x = (W diag(s)) (diag(s)^-1 x), and diag(s)^-1 folds into the previous op (an RMSNorm or a linear).
Then each weight group's range is searched, and the weights are rounded on that grid with error feedback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.quant.rtn import GroupQuantized, fake_quantize, group_params

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_SAMPLE_TOKENS = 512
# The ratio search scores each candidate on a sample of the calibration tokens (the scales themselves
# come from all of them): choosing one of 20 ratios needs far fewer tokens than the statistics do.
SEARCH_SAMPLE_TOKENS = 1024
SKIP_CLIP = ("q_proj", "k_proj")  # AutoAWQ: clipping q/k hurts the softmax more than it helps
GPTQ_DAMP = 0.1
"""Dampening added to the Hessian's diagonal, as a fraction of its mean (GPTQ's percdamp, default 0.01 there).

A Hessian from a few thousand calibration tokens is a noisy estimate (down_proj's is 1536 x 1536); more
damping pulls the rounding toward plain nearest. Chosen on calibration text that the 16 x 256 samples do
not cover (perplexity 20.80 / 20.59 / 20.63 at 0.01 / 0.1 / 0.3), never on the held-out text."""
# v -> o scales under grouped-query attention: exact, but measured worse on SmolLM2-135M (quant_quality.md).
GQA_V_O = False


@dataclass(frozen=True)
class QuantSpec:
    w_bits: int
    group_size: int
    symmetric: bool

    def fake(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.w_bits, self.group_size, self.symmetric)


@dataclass(frozen=True)
class HeadSharing:
    """Grouped-query attention: v_proj's output channel (kv head g, dim d) feeds o_proj's input channels
    (h, d) of every query head h that reads kv head g, so one v scale serves num_repeats o_proj channels."""

    num_kv_heads: int
    num_repeats: int
    head_dim: int

    def expand(self, kv_values: torch.Tensor) -> torch.Tensor:
        """[kv heads * head_dim] -> [query heads * head_dim] (query head h reads kv head h // num_repeats)."""
        grid = kv_values.view(self.num_kv_heads, 1, self.head_dim)
        return grid.expand(-1, self.num_repeats, -1).reshape(-1)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """[query heads * head_dim] -> [kv heads * head_dim], the mean over the query heads of each kv head."""
        return values.view(self.num_kv_heads, self.num_repeats, self.head_dim).mean(dim=1).reshape(-1)


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
    sharing: HeadSharing | None = None
    """Set when prev_op has fewer output channels than the linears have inputs (v -> o under GQA)."""

    def prev_op_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The linears' input scales as prev_op's output scales (equal channels share one scale)."""
        if self.sharing is None:
            return scales
        sharing = self.sharing
        return scales.view(sharing.num_kv_heads, sharing.num_repeats, sharing.head_dim)[:, 0].reshape(-1)


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
    sharing = _head_sharing(attn) if GQA_V_O else None
    if sharing is not None or attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(
            ScaleGroup(
                attn.v_proj,
                ["self_attn.o_proj"],
                "self_attn.o_proj",
                _per_batch(attn.o_proj),
                sharing=sharing,
            )
        )
    groups.append(
        ScaleGroup(
            layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_proj", _per_batch(mlp)
        )
    )
    groups.append(ScaleGroup(mlp.up_proj, ["mlp.down_proj"], "mlp.down_proj", _per_batch(mlp.down_proj)))
    return groups


def _head_sharing(attn: Any) -> HeadSharing | None:
    """How v's channels map onto o_proj's inputs under grouped-query attention (None: one to one, or unknown).

    AutoAWQ skips v -> o when the shapes differ. Scaling v's output channel (g, d) by 1/s scales the attention
    output channel (h, d) of every query head h of group g by 1/s (softmax weights do not involve v), so o_proj's
    input channels (h, d) take s exactly when the scales are shared within each kv group.
    """
    head_dim = getattr(attn, "head_dim", None)
    num_repeats = getattr(attn, "num_key_value_groups", None)
    if not head_dim or not num_repeats or num_repeats == 1:
        return None
    num_kv_heads = attn.v_proj.out_features // head_dim
    if num_kv_heads * num_repeats * head_dim != attn.o_proj.in_features:
        return None
    return HeadSharing(num_kv_heads, num_repeats, head_dim)


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
def apply_scales(
    prev_op: Any, linears: list[Any], scales: torch.Tensor, prev_scales: torch.Tensor | None = None
) -> None:
    """Fold diag(s)^-1 into prev_op's output and diag(s) into each linear's input columns.

    prev_scales: prev_op's output scales when they differ in length from the linears' inputs (GQA v -> o).
    """
    scales = scales.to(linears[0].weight.device)
    prev = scales if prev_scales is None else prev_scales.to(scales.device)
    if isinstance(prev_op, nn.Linear):
        prev_op.weight.div_(prev.view(-1, 1).to(prev_op.weight.dtype))
        if prev_op.bias is not None:
            prev_op.bias.div_(prev.to(prev_op.bias.dtype))
    else:  # RMSNorm: y = weight * normalized(x)
        prev_op.weight.div_(prev.to(prev_op.weight.dtype))
    for linear in linears:
        linear.weight.mul_(scales.view(1, -1).to(linear.weight.dtype))


@torch.no_grad()
def search_scales(group: ScaleGroup, layer: Any, inputs: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Grid search over the ratio (AutoAWQ with duo scaling); candidate 1 keeps plain RTN in the running."""
    linears = [layer.get_submodule(name) for name in group.linears]
    originals = [linear.weight.detach().clone() for linear in linears]
    act_mean = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).abs().float().mean(dim=0)
    weight_mean = weight_channel_mean(torch.cat(originals), spec.group_size)
    if group.sharing is not None:  # candidates live on prev_op's channels, one scale per kv-head channel
        act_mean, weight_mean = group.sharing.reduce(act_mean), group.sharing.reduce(weight_mean)
    sampled, batch_ids = sample_inputs(inputs, group.per_token)
    reference = group.inspect(sampled, batch_ids)
    candidates = [torch.ones_like(act_mean)] + [
        ratio_scales(act_mean, weight_mean, i / N_GRID) for i in range(N_GRID)
    ]
    if group.sharing is not None:
        candidates = [group.sharing.expand(c) for c in candidates]
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
    gram = _group_gram(inputs, num_groups, spec.group_size)
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


def _group_gram(inputs: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    step = max(1, len(inputs) // CLIP_SAMPLE_TOKENS)
    x = inputs[::step].float()
    x_groups = x.reshape(len(x), num_groups, group_size).transpose(0, 1)  # [groups, tokens, g]
    return torch.bmm(x_groups.transpose(1, 2), x_groups) / len(x)  # [groups, g, g]


def _quadratic_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """d^T G d per (output channel, group): delta [out, groups, g], gram [groups, g, g] -> [out, groups, 1]."""
    projected = torch.bmm(delta.transpose(0, 1), gram)  # [groups, out, g]
    return (projected * delta.transpose(0, 1)).sum(dim=-1).t().unsqueeze(-1)


def input_hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
    """H = X^T X / n over every calibration token of a linear's input: [in, in]."""
    total = torch.zeros(inputs[0].shape[-1], inputs[0].shape[-1])
    count = 0
    for x in inputs:
        rows = x.reshape(-1, x.shape[-1]).float()
        total += rows.t() @ rows
        count += len(rows)
    return total / count


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, clip_max: torch.Tensor | None = None
) -> GroupQuantized:
    """Integer weights that minimize the layer's output error tr(D H D^T), not each weight's own error.

    GPTQ (Frantar et al., 2022) on AWQ's grid: columns are rounded left to right and each one's error is
    pushed onto the columns not yet rounded, through the inverse Hessian. A group's scale and zero point
    come from its weights (already scaled by AWQ) as updated when the group is reached, so the checkpoint
    layout is unchanged. The AWQ paper notes the two are orthogonal and combine.

    clip_max ([out, groups, 1], from search_clip) narrows each group's range to [-clip_max, clip_max] but the
    weights themselves are not clipped: the rounding aims at the true weights and compensates what the
    narrower range cuts off, where clipping them first would make that cut part of the target.
    """
    w = weight.float().clone()
    upper = _inverse_hessian_factor(hessian, w)
    codes = torch.empty(w.shape, dtype=torch.int32)
    scales, zeros = [], []
    for start in range(0, w.shape[1], spec.group_size):
        end = start + spec.group_size
        group_scales, group_zeros = group_params(
            _clipped(w[:, start:end], clip_max, start // spec.group_size), spec.w_bits, spec.symmetric
        )
        group_scales = group_scales.half().float()  # the feedback sees the scales the checkpoint stores
        grid = _Grid(group_scales, group_zeros, 2**spec.w_bits - 1)
        errors = _round_columns(w[:, start:end], upper[start:end, start:end], grid, codes[:, start:end])
        w[:, end:] -= errors @ upper[start:end, end:]
        scales.append(group_scales)
        zeros.append(group_zeros)
    return GroupQuantized(
        codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1).to(torch.int32), spec.group_size
    )


def _clipped(block: torch.Tensor, clip_max: torch.Tensor | None, group: int) -> torch.Tensor:
    if clip_max is None:
        return block
    limit = clip_max[:, group].to(block.dtype)
    return torch.maximum(torch.minimum(block, limit), -limit)


@dataclass(frozen=True)
class _Grid:
    scales: torch.Tensor  # [out, 1]
    zeros: torch.Tensor  # [out, 1]
    max_int: int


def _round_columns(
    block: torch.Tensor, upper: torch.Tensor, grid: _Grid, codes: torch.Tensor
) -> torch.Tensor:
    """Round block's columns in place (writing codes), each error spread over the block's later columns."""
    errors = torch.empty_like(block)
    for i in range(block.shape[1]):
        column = block[:, i : i + 1]
        q = (torch.round(column / grid.scales) + grid.zeros).clamp(0, grid.max_int)
        codes[:, i] = q[:, 0].to(torch.int32)
        errors[:, i : i + 1] = (column - (q - grid.zeros) * grid.scales) / upper[i, i]
        block[:, i:] -= errors[:, i : i + 1] * upper[i : i + 1, i:]
    return errors


def _inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1; inputs that never fire are zeroed in weight (GPTQ's recipe)."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h.diagonal().add_(GPTQ_DAMP * torch.diagonal(h).mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
