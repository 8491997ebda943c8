"""Gemma 3 text decoder: scaled embedding, (1 + w) norms around both blocks, q/k norms, GeGLU, local/global rope."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmserve.attention.backend import AttentionBackend
from lmserve.layers.embedding import VocabEmbedding
from lmserve.layers.norm import GemmaRMSNorm
from lmserve.layers.rotary import RopeInputs, RotaryEmbedding
from lmserve.models.config import ModelConfig
from lmserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Gemma3Attention(LlamaAttention):
    """Llama's attention with Gemma's q/k norms; scale and window come from the config (query_pre_attn_scalar)."""

    head_norm_class = GemmaRMSNorm


class Gemma3DecoderLayer(nn.Module):
    """Four norms: before and after attention, before and after the MLP; each block's output is normed
    before it joins the residual stream."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(config, backend, layer_index)
        self.mlp = LlamaMLP(config)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    @property
    def is_sliding(self) -> bool:
        return self.self_attn.sliding_window is not None

    def forward(self, hidden: torch.Tensor, rope: RopeInputs, kv_cache: Any, attn_plan: Any) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden), rope, kv_cache, attn_plan)
        hidden = hidden + self.post_attention_layernorm(attended)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma3Model(nn.Module):
    """Embedding scaled by sqrt(hidden) in the compute dtype, the layers, the final norm; the sliding (local)
    layers rotate with rope_local_theta, the global ones with rope_theta and its scaling."""

    embed_scale: torch.Tensor

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # built under the model's default dtype and device: rounded to the weights' dtype as HF does, and no
        # host-to-device copy per step (which a CUDA graph capture would refuse)
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, backend, i) for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        max_positions = config.max_position_embeddings
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        local_theta = config.rope_local_theta or config.rope_theta
        self.rotary_local = RotaryEmbedding(config.head_dim, max_positions, local_theta, None)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[Any], attn_plan: Any
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        rope_global, rope_local = self.rotary.prepare(positions), self.rotary_local.prepare(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, rope_local if layer.is_sliding else rope_global, kv_cache, attn_plan)
        return self.norm(hidden)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 (text): Llama's contract and weight loading over Gemma3Model; logits soft-capped when configured."""

    model_class = Gemma3Model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap
