"""ModelConfig: one normalized description of a decoder, whatever the checkpoint format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, read from config.json or GGUF metadata."""

    architecture: str
    """HF `architectures[0]`, e.g. LlamaForCausalLM, Qwen2ForCausalLM, InternLM2ForCausalLM."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF rope_scaling dict (llama3, linear, dynamic ...), or None."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections have biases (Qwen2: True; Llama: config.attention_bias)."""
    mlp_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    """The checkpoint's dtype name (bfloat16, float16, float32)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization_config: dict[str, Any] | None = None
    """HF quantization_config (quant_method awq / compressed-tensors ...), or None."""
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
