"""AWQ search pieces against direct computation: the Gram-matrix clip error and the token sampling."""

from __future__ import annotations

import torch

from lmserve.quant import awq

SPEC = awq.QuantSpec(w_bits=4, group_size=16, symmetric=False)


def _direct_clip(weight: torch.Tensor, x: torch.Tensor, spec: awq.QuantSpec) -> torch.Tensor:
    """AutoAWQ's clip search as written there: every candidate's output error over the tokens."""
    out_features, in_features = weight.shape
    num_groups = in_features // spec.group_size
    x_groups = x.reshape(len(x), num_groups, spec.group_size).transpose(0, 1)
    w = weight.reshape(out_features, num_groups, spec.group_size)
    original_max = w.abs().amax(dim=-1, keepdim=True)
    best_max, min_error = original_max.clone(), torch.full_like(original_max, float("inf"))
    reference = torch.bmm(x_groups, w.permute(1, 2, 0))
    for shrink_step in range(int(awq.MAX_SHRINK * awq.N_GRID)):
        max_val = original_max * (1 - shrink_step / awq.N_GRID)
        clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
        quantized = spec.fake(clipped.reshape(out_features, in_features)).reshape(w.shape)
        error = (torch.bmm(x_groups, quantized.permute(1, 2, 0)) - reference).pow(2).mean(dim=1)
        better = error.t().unsqueeze(-1) < min_error
        min_error[better], best_max[better] = error.t().unsqueeze(-1)[better], max_val[better]
    return best_max


def test_gram_clip_search_picks_what_the_direct_search_picks() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 64, dtype=torch.float64) * torch.rand(64, dtype=torch.float64)
    x = torch.randn(300, 64, dtype=torch.float64) * torch.rand(64, dtype=torch.float64) * 3
    chosen = awq.search_clip(weight, x, SPEC)
    assert torch.equal(chosen, _direct_clip(weight.float(), x.float(), SPEC).to(chosen.dtype))
    assert (chosen < weight.abs().reshape(48, 4, 16).amax(-1, keepdim=True)).any()  # some groups clip


def test_per_token_sampling_spreads_rows_over_all_batches() -> None:
    inputs = [torch.full((1, 100, 4), float(i)) for i in range(10)]
    (sampled,), batch_ids = awq.sample_inputs(inputs, per_token=True, num_tokens=50)
    assert sampled.shape == (1, 50, 4) and batch_ids == [0]
    assert set(sampled[0, :, 0].tolist()) == set(map(float, range(10)))


def test_sequence_sampling_keeps_whole_batches_first_and_last() -> None:
    inputs = [torch.full((1, 100, 4), float(i)) for i in range(10)]
    sampled, batch_ids = awq.sample_inputs(inputs, per_token=False, num_tokens=300)
    assert batch_ids == [0, 4, 9]
    assert all(torch.equal(s, inputs[i]) for s, i in zip(sampled, batch_ids, strict=True))
    assert awq.sample_inputs(inputs, per_token=False, num_tokens=50)[1] == [0]  # at least one sequence
