"""Qwen3-MoE: Qwen3's attention (q/k norms: config.qk_norm) over sparse MoE layers, dense where configured."""

from __future__ import annotations

from lmserve.models.mixtral import MixtralForCausalLM


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Experts under `mlp.experts.{e}.gate_proj|up_proj|down_proj` (MoEWeightLoader); `decoder_sparse_step` and
    `mlp_only_layers` (config.moe) make some layers dense, with the model's intermediate_size; top-k weights
    are renormalized when `norm_topk_prob`."""
