"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors) read into per-module (A, B) pairs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmserve.models.source import read_json

if TYPE_CHECKING:  # the CLI imports parse_adapters without torch
    import torch

    from lmserve.models.config import ModelConfig

MAX_LORA_RANK = 64
TARGET_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter: for each targeted projection (HF module path, e.g. `model.layers.0.self_attn.q_proj`)
    its A [r, in] and B [out, r] with PEFT's scaling already folded into B, so the update is B (A x)."""

    name: str
    path: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_adapter(name: str, path: str) -> LoRAAdapter:
    """Read a PEFT LoRA folder; ValueError naming the adapter and the problem for anything we cannot honour."""
    config = _read_config(name, path)
    rank = int(config.get("r", 8))
    if not 1 <= rank <= MAX_LORA_RANK:
        raise ValueError(f"adapter {name!r}: r={rank} must be in 1..{MAX_LORA_RANK}")
    scaling = lora_scaling(config, rank)
    tensors = _read_tensors(name, path)
    weights = {
        module: _pair(name, module, tensors, rank, scaling) for module in _target_modules(name, tensors)
    }
    return LoRAAdapter(name, path, rank, weights)


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each HF projection of a dense decoder layer."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    hidden, intermediate = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def lora_scaling(config: dict[str, Any], rank: int) -> float:
    """PEFT's scale of B A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    alpha = float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_config(name: str, path: str) -> dict[str, Any]:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"adapter {name!r}: {config_path} not found (a PEFT LoRA folder has {CONFIG_FILE})")
    config = read_json(Path(config_path))  # a broken file: ValueError naming it
    _check_supported(name, config)
    return config


def _check_supported(name: str, config: dict[str, Any]) -> None:
    """Refuse PEFT options that change the math we would otherwise silently get wrong."""
    refusals = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type={config.get('peft_type')!r} is not LORA"),
        (bool(config.get("use_dora")), "use_dora=true (DoRA) is not supported"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} is not supported (only 'none')"),
        (bool(config.get("modules_to_save")), "modules_to_save is not supported"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out=true is not supported"),
        (bool(config.get("rank_pattern")), "rank_pattern is not supported"),
        (bool(config.get("alpha_pattern")), "alpha_pattern is not supported"),
    ]
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"adapter {name!r}: {reason}")


def _read_tensors(name: str, path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise ValueError(f"adapter {name!r}: {weights_path} not found (only safetensors adapters are read)")
    return {key.removeprefix(_PEFT_PREFIX): value for key, value in load_file(weights_path).items()}


def _target_modules(name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    """HF module paths with LoRA weights; anything but lora_A/lora_B of q/k/v/o/gate/up/down is refused."""
    modules = []
    for key in sorted(tensors):
        module, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (not supported)")
        if module.rpartition(".")[2] not in TARGET_PROJECTIONS:
            raise ValueError(f"adapter {name!r}: targets {module!r}; supported targets: {TARGET_PROJECTIONS}")
        if kind == "A.weight":
            modules.append(module)
    return modules


def _pair(
    name: str, module: str, tensors: dict[str, torch.Tensor], rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    a = tensors[f"{module}.lora_A.weight"].float()
    b = tensors.get(f"{module}.lora_B.weight")
    if b is None:
        raise ValueError(f"adapter {name!r}: {module} has lora_A but no lora_B")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(
            f"adapter {name!r}: {module} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank r={rank}"
        )
    return a, b.float() * scaling


def parse_adapters(values: list[str] | None) -> dict[str, str] | None:
    """`--adapters NAME=PATH ...` (LMDeploy's flag; one bare PATH is named `default`) -> {name: path}."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return {"default": values[0]}
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"adapters: {value!r} must be NAME=PATH")
        if name in adapters:
            raise ValueError(f"adapters: the name {name!r} is given twice")
        adapters[name] = path
    return adapters
