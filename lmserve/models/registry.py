"""HF `architectures` name -> model class (imported lazily), and build_model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from lmserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from lmserve.attention.backend import AttentionBackend

__all__ = ["SUPPORTED_ARCHITECTURES", "build_model", "model_class"]

_MODEL_CLASSES = {
    "LlamaForCausalLM": ("lmserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("lmserve.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("lmserve.models.llama", "LlamaForCausalLM"),
    "InternLM2ForCausalLM": ("lmserve.models.internlm2", "InternLM2ForCausalLM"),
    "InternLM3ForCausalLM": ("lmserve.models.llama", "LlamaForCausalLM"),  # Llama names and layout
    "Qwen3ForCausalLM": ("lmserve.models.llama", "LlamaForCausalLM"),  # + q/k norms (config.qk_norm)
    "Gemma3ForCausalLM": ("lmserve.models.gemma3", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("lmserve.models.mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("lmserve.models.qwen3_moe", "Qwen3MoeForCausalLM"),
}
assert set(_MODEL_CLASSES) == set(SUPPORTED_ARCHITECTURES)


def model_class(architecture: str) -> type[nn.Module]:
    """The class implementing an HF architecture name."""
    if architecture not in _MODEL_CLASSES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    module_name, class_name = _MODEL_CLASSES[architecture]
    return getattr(importlib.import_module(module_name), class_name)


def build_model(
    config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """An uninitialized CausalLM for config, built in dtype on device; fill it with load_weights."""
    if config.has_sliding_window and not backend.supports_sliding_window:
        raise ValueError(
            f"{config.architecture} has sliding-window layers (window {config.sliding_window}), which "
            f"{type(backend).__name__} does not support; use --quant-policy 0 (or the CPU/torch backend)"
        )
    return model_class(config.architecture)(config, backend, dtype, device)
