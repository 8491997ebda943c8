"""Loading adapters into a built model: stacks per fused linear, the wrapped modules, name -> slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmserve.lora.adapter import LoRAAdapter, load_adapter, projection_shapes
from lmserve.lora.layers import LoRAContext, LoRALinear
from lmserve.models.config import ModelConfig

# HF projection -> (our module, which of its output slices)
FUSED_TARGETS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


@dataclass(frozen=True)
class SliceUpdate:
    """One adapter's (A [r, in], scaled B [out_slice, r]) for one slice of one of our linears."""

    adapter_index: int
    slice_index: int
    a: torch.Tensor
    b: torch.Tensor
    source: str
    """For errors: `adapter 'NAME' model.layers.0.self_attn.q_proj`."""


class LoRAManager:
    """The adapters loaded into one model: their slots (1..N in load order; 0 is the base) and step context."""

    def __init__(self, adapters: list[LoRAAdapter], context: LoRAContext) -> None:
        self.adapters = adapters
        self.context = context
        self._slots = {adapter.name: i + 1 for i, adapter in enumerate(adapters)}

    @property
    def names(self) -> list[str]:
        return [adapter.name for adapter in self.adapters]

    def slot_of(self, adapter_name: str | None) -> int:
        """0 for the base model; ValueError naming the loaded adapters for an unknown name."""
        if adapter_name is None:
            return 0
        slot = self._slots.get(adapter_name)
        if slot is None:
            raise ValueError(f"adapter_name={adapter_name!r} is not loaded; loaded adapters: {self.names}")
        return slot


def adapter_slot(manager: LoRAManager | None, adapter_name: str | None) -> int:
    """A request's slot: 0 for the base model; ValueError for an adapter this engine did not load."""
    if manager is None and adapter_name is not None:
        raise ValueError(
            f"adapter_name={adapter_name!r}: this engine has no adapters (start it with --adapters)"
        )
    return 0 if manager is None else manager.slot_of(adapter_name)


def attach_adapters(
    model: nn.Module,
    model_config: ModelConfig,
    adapters: dict[str, str],
    device: torch.device,
    dtype: torch.dtype,
) -> LoRAManager:
    """Load each `name: PEFT folder`, and wrap every linear one of them targets in a LoRALinear over the stacks."""
    loaded = [load_adapter(name, path) for name, path in adapters.items()]
    context = LoRAContext(len(loaded), device, dtype)
    for module_path, updates in _updates_by_module(loaded).items():
        parent_path, _, child = module_path.rpartition(".")
        base = _target(model, module_path, updates[0])
        a, bt = stack_updates(updates, len(loaded), slice_sizes(model_config, child), device, dtype)
        model.get_submodule(parent_path).register_module(child, LoRALinear(base, a, bt, context))
    return LoRAManager(loaded, context)


def _updates_by_module(adapters: list[LoRAAdapter]) -> dict[str, list[SliceUpdate]]:
    """Our module path (`model.layers.0.self_attn.qkv_proj`) -> every adapter's updates of its slices."""
    by_module: dict[str, list[SliceUpdate]] = {}
    for index, adapter in enumerate(adapters):
        for hf_path, (a, b) in adapter.weights.items():
            parent, _, projection = hf_path.rpartition(".")
            ours, slice_index = FUSED_TARGETS[projection]
            source = f"adapter {adapter.name!r} {hf_path}"
            update = SliceUpdate(index, slice_index, a, b, source)
            by_module.setdefault(f"{parent}.{ours}", []).append(update)
    return by_module


def _target(model: nn.Module, module_path: str, update: SliceUpdate) -> nn.Module:
    """Our linear at module_path; ValueError when the model has none there (another architecture, an MoE layer)."""
    try:
        return model.get_submodule(module_path)
    except AttributeError:
        raise ValueError(f"{update.source}: this model has no {module_path} to apply it to") from None


def slice_sizes(config: ModelConfig, module: str) -> tuple[int, tuple[int, ...]]:
    """(in_features, output features of each slice) of one of our LoRA-able linears (tp 1)."""
    shapes = projection_shapes(config)
    projections = [hf for hf, (ours, _) in FUSED_TARGETS.items() if ours == module]  # in slice order
    return shapes[projections[0]][0], tuple(shapes[hf][1] for hf in projections)


def stack_updates(
    updates: list[SliceUpdate],
    num_adapters: int,
    shape: tuple[int, tuple[int, ...]],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [N, S*R, in], bt [N, S*R, out]) for a linear of S slices, R = the largest rank given: slice j of
    adapter k owns rank rows j*R .. j*R + r of A and the matching rows of B^T at its output columns (block
    diagonal); everything an adapter does not target stays zero."""
    in_features, sizes = shape
    rank = max(update.a.shape[0] for update in updates)
    a = torch.zeros(num_adapters, len(sizes) * rank, in_features)
    bt = torch.zeros(num_adapters, len(sizes) * rank, sum(sizes))
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    for update in updates:
        j, r = update.slice_index, update.a.shape[0]
        _check_shapes(update, in_features, sizes[j])
        a[update.adapter_index, j * rank : j * rank + r] = update.a
        bt[update.adapter_index, j * rank : j * rank + r, offsets[j] : offsets[j] + sizes[j]] = update.b.T
    return a.to(device, dtype).contiguous(), bt.to(device, dtype).contiguous()


def _check_shapes(update: SliceUpdate, in_features: int, out_features: int) -> None:
    if update.a.shape[1] != in_features or update.b.shape[0] != out_features:
        raise ValueError(
            f"{update.source}: A {tuple(update.a.shape)}, B {tuple(update.b.shape)} do not fit this model's "
            f"{in_features} -> {out_features} projection (an adapter of another base model?)"
        )
