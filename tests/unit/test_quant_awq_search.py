"""AWQ search pieces against direct computation: the Gram-matrix clip error and the token sampling."""

from __future__ import annotations

import torch

from lmserve.quant import awq
from lmserve.quant.rtn import dequantize_groups, quantize_groups

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


def _gqa_attention() -> tuple[torch.nn.Module, dict]:
    """A float64 Llama attention block with 6 query heads over 2 kv heads, and its keyword arguments."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=64
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = transformers.models.llama.modeling_llama.LlamaAttention(config, layer_idx=0).double()
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.randn(1, 10, 48, dtype=torch.float64)
    cos, sin = rotary(x, torch.arange(10).unsqueeze(0))
    mask = torch.full((10, 10), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    return attn, {"hidden_states": x, "position_embeddings": (cos, sin), "attention_mask": mask}


def test_gqa_v_to_o_scaling_is_exact() -> None:
    """Under grouped-query attention the v -> o group scales v per kv channel and o_proj per query channel."""
    attn, kwargs = _gqa_attention()
    sharing = awq._head_sharing(attn)
    assert sharing == awq.HeadSharing(num_kv_heads=2, num_repeats=3, head_dim=8)
    group = awq.ScaleGroup(attn.v_proj, ["o_proj"], "o_proj", lambda xs, _: xs, sharing=sharing)
    kv_scales = torch.rand(16, dtype=torch.float64) * 4 + 0.1
    scales = sharing.expand(kv_scales)
    assert scales.shape == (48,) and torch.equal(scales[8:16], kv_scales[:8])  # head 1 reads kv head 0
    assert torch.equal(scales[24:32], kv_scales[8:])  # head 3 reads kv head 1
    assert torch.equal(group.prev_op_scales(scales), kv_scales)
    before = attn(**kwargs)[0]
    awq.apply_scales(attn.v_proj, [attn.o_proj], scales, group.prev_op_scales(scales))
    torch.testing.assert_close(attn(**kwargs)[0], before, rtol=1e-10, atol=1e-12)
    # The other mapping (query head h reading kv head h % 2) is not exact: the test can tell them apart.
    awq.apply_scales(attn.v_proj, [attn.o_proj], kv_scales.view(2, 8).repeat(3, 1).reshape(-1), kv_scales)
    assert not torch.allclose(attn(**kwargs)[0], before)


def _textbook_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: awq.QuantSpec) -> torch.Tensor:
    """GPTQ as the paper's equations state it: after rounding column i, w_F -= err * Hinv[i, F] / Hinv[i, i],
    then drop i from the inverse Hessian by a Schur complement. Group grids from the weights as updated."""
    from lmserve.quant.rtn import group_params

    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(awq.GPTQ_DAMP * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(w.shape, dtype=torch.int32)
    for i in range(w.shape[1]):
        if i % spec.group_size == 0:
            scales, zeros = group_params(w[:, i : i + spec.group_size].float(), spec.w_bits, spec.symmetric)
            scales, zeros = scales.half().double(), zeros.double()
        q = (torch.round(w[:, i : i + 1] / scales) + zeros).clamp(0, 2**spec.w_bits - 1)
        codes[:, i] = q[:, 0].to(torch.int32)
        error = (w[:, i : i + 1] - (q - zeros) * scales) / hinv[i, i]
        w[:, i:] -= error * hinv[i : i + 1, i:]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return codes


def _correlated_inputs(num_tokens: int, features: int) -> torch.Tensor:
    mixing = torch.randn(features, features) / features**0.5 + torch.eye(features)
    return (torch.randn(num_tokens, features) @ mixing) * (torch.rand(features) * 3 + 0.2)


def test_gptq_round_matches_the_papers_update_rule() -> None:
    torch.manual_seed(1)
    weight = torch.randn(24, 64)
    hessian = awq.input_hessian([_correlated_inputs(400, 64)])
    quantized = awq.gptq_round(weight, hessian, SPEC)
    textbook = _textbook_gptq(weight, hessian, SPEC)
    assert quantized.q.ne(textbook).float().mean() < 0.01  # float32 vs float64 may flip a tie or two


def test_gptq_round_with_uncorrelated_inputs_is_round_to_nearest() -> None:
    """With H diagonal no error can be compensated, so every weight rounds to its nearest grid point."""
    torch.manual_seed(2)
    weight = torch.randn(16, 64)
    quantized = awq.gptq_round(weight, torch.diag(torch.rand(64) + 0.5), SPEC)
    nearest = quantize_groups(weight, 4, SPEC.group_size, symmetric=False)
    assert torch.equal(quantized.q, nearest.q) and torch.equal(quantized.zeros, nearest.zeros)
    assert torch.equal(quantized.scales, nearest.scales.half().float())


def test_gptq_round_lowers_the_output_error_of_round_to_nearest() -> None:
    torch.manual_seed(3)
    weight, x = torch.randn(64, 128), _correlated_inputs(2000, 128)
    hessian = awq.input_hessian([x[:1000]])
    gptq = dequantize_groups(awq.gptq_round(weight, hessian, SPEC))
    nearest = dequantize_groups(quantize_groups(weight, 4, SPEC.group_size, symmetric=False))
    held_out = x[1000:]  # tokens the Hessian did not see

    def output_error(quantized: torch.Tensor) -> float:
        return float((held_out @ (weight - quantized).t()).pow(2).mean())

    assert output_error(gptq) < 0.8 * output_error(nearest)


def test_gptq_round_takes_the_clipped_range_but_rounds_the_true_weights() -> None:
    torch.manual_seed(4)
    weight = torch.randn(8, 32)
    clip_max = weight.abs().reshape(8, 2, 16).amax(-1, keepdim=True) * 0.7
    quantized = awq.gptq_round(weight, torch.eye(32), SPEC, clip_max)  # H = I: no error feedback
    clipped = torch.maximum(torch.minimum(weight.reshape(8, 2, 16), clip_max), -clip_max).reshape(8, 32)
    grid = quantize_groups(clipped, 4, SPEC.group_size, symmetric=False)
    assert torch.equal(quantized.scales, grid.scales.half().float()) and torch.equal(
        quantized.zeros, grid.zeros
    )
    scales = quantized.scales.repeat_interleave(16, dim=1)
    zeros = quantized.zeros.repeat_interleave(16, dim=1)
    nearest = (torch.round(weight / scales) + zeros).clamp(0, 15)  # the unclipped weights on that grid
    assert torch.equal(quantized.q, nearest.to(torch.int32))
    assert not torch.equal(quantized.q, quantize_groups(weight, 4, 16, symmetric=False).q)
