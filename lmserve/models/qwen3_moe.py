"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm before rotary) over sparse MoE layers, dense where configured."""

from __future__ import annotations

from typing import Any

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RopeInputs, rotate_qk
from lmserve.models.config import ModelConfig
from lmserve.models.llama import LlamaAttention, default_dtype_and_device
from lmserve.models.mixtral import MixtralForCausalLM


class QKNormAttention(LlamaAttention):
    """LlamaAttention with an RMSNorm over each q and k head (weights [head_dim]) before rotary."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(config, backend)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, rope: RopeInputs, kv_cache: Any, attn_plan: Any) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        num_tokens = qkv.shape[0]
        q = qkv[:, : self.q_size].reshape(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].reshape(
            num_tokens, self.num_kv_heads, self.head_dim
        )
        q, k = rotate_qk(torch.cat([self.q_norm(q), self.k_norm(k)], dim=1), self.num_heads, rope)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache, attn_plan, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Experts under `mlp.experts.{e}.gate_proj|up_proj|down_proj`; `decoder_sparse_step` and `mlp_only_layers`
    (config.moe) pick the dense layers, whose MLP has the model's intermediate_size; top-k weights are
    renormalized when `norm_topk_prob`."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(config, backend, dtype, device)
        with default_dtype_and_device(dtype, device):
            for layer in self.model.layers:
                layer.self_attn = QKNormAttention(config, backend)
