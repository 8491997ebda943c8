"""Random LoRA adapters in PEFT's folder layout for a model's shapes (benchmarks and server tests)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from lmserve.lora.adapter import CONFIG_FILE, TARGET_PROJECTIONS, WEIGHTS_FILE, projection_shapes
from lmserve.models.config import ModelConfig


def save_random_adapter(
    folder: str,
    config: ModelConfig,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = TARGET_PROJECTIONS,
    seed: int = 0,
) -> str:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's names) with random A and B; returns folder.

    B is random too (PEFT initializes it to zero, which would make the adapter a no-op), sized so the update
    moves the logits clearly without swamping the base model.
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for projection in targets:
            in_features, out_features = shapes[projection]
            block = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) / in_features**0.5
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE))
    peft_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
    }
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(peft_config, f)
    return folder
