"""Mixtral: the Llama decoder with a sparse MoE MLP, and the loader of expert tensors into stacked parameters.

Expert tensors arrive in any of these layouts, each copied straight into its slice of the stacked
`mlp.experts.gate_up_proj` [E, 2I, H] / `mlp.experts.down_proj` [E, H, I] (no per-layer buffering):
- per expert (HF checkpoints): Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2`, Qwen3-MoE
  `mlp.experts.{e}.gate_proj|up_proj|down_proj`; AutoAWQ ones as qweight/qzeros/scales, dequantized here;
- stacked per projection (GGUF `ffn_gate_exps` ...): `mlp.experts.gate_proj|up_proj|down_proj.weight` [E, out, in];
- stacked as the model holds them (transformers 5's state dict): `mlp.experts.gate_up_proj` / `down_proj`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.layers.quant_formats import awq_dequantize, quant_method
from lmserve.models.config import ModelConfig
from lmserve.models.llama import LlamaForCausalLM, WeightLoader

logger = logging.getLogger(__name__)

# checkpoint projection -> (stacked parameter, half of gate_up it fills or None for all of it)
EXPERT_PROJECTIONS: dict[str, tuple[str, int | None]] = {
    "w1": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "w2": ("down_proj", None),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
}
_EXPERT_TENSOR = re.compile(
    r"(?P<experts>.*\.experts)(?:\.(?P<expert>\d+))?\.(?P<projection>\w+)\.(?P<param>weight|qweight|qzeros|scales)"
)
_AWQ_PARAMS = ("qweight", "qzeros", "scales")


class MoEWeightLoader(WeightLoader):
    """WeightLoader that also routes expert tensors into the stacked expert parameters (see module docstring)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__(model)
        self.filled: dict[str, set[tuple[int, int | None]]] = {}
        self.awq_parts: dict[str, dict[str, torch.Tensor]] = {}
        self.warned_awq = False

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load(weights)
        if self.awq_parts:
            raise ValueError(
                f"incomplete AWQ expert weights (qweight/qzeros/scales): {sorted(self.awq_parts)}"
            )

    def load_one(self, name: str, tensor: torch.Tensor) -> None:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MoE block
        match = _EXPERT_TENSOR.fullmatch(name)
        if match is None or match["projection"] not in EXPERT_PROJECTIONS:
            super().load_one(name, tensor)
            return
        if match["param"] != "weight":
            self.collect_awq(match, name, tensor)
            return
        expert = None if match["expert"] is None else int(match["expert"])
        self.copy_expert(match["experts"], expert, match["projection"], tensor, name)

    def copy_expert(
        self, experts: str, expert: int | None, projection: str, tensor: torch.Tensor, source: str
    ) -> None:
        """Copy one expert's [out, in] weight (or all experts' [E, out, in] when expert is None) into its slice."""
        stacked, half = EXPERT_PROJECTIONS[projection]
        target = f"{experts}.{stacked}"
        param = self.targets.get(target)
        if param is None:
            raise ValueError(f"unexpected weight {source!r}: the model has no parameter {target!r}")
        num_experts = param.shape[0]
        if expert is not None and expert >= num_experts:
            raise ValueError(f"weight {source!r}: expert {expert} >= num_experts={num_experts}")
        view = param.detach() if expert is None else param.detach()[expert]
        if half is not None:
            view = view.chunk(2, dim=-2)[half]
        if view.shape != tensor.shape:
            raise ValueError(
                f"weight {source!r} has shape {tuple(tensor.shape)}, expected {tuple(view.shape)}"
            )
        view.copy_(tensor)
        slices = self.filled.setdefault(target, set())
        slices.update((e, half) for e in (range(num_experts) if expert is None else (expert,)))
        if len(slices) == num_experts * (1 if half is None else 2):
            self.loaded.add(target)

    def collect_awq(self, match: re.Match[str], name: str, tensor: torch.Tensor) -> None:
        """AutoAWQ expert tensors: once an expert's three arrive, dequantize to [out, in] and copy that in."""
        quant = self.model.config.quantization_config
        if match["expert"] is None or quant_method(quant) != "awq":
            raise ValueError(
                f"weight {name!r}: quantized experts are read only as per-expert AutoAWQ tensors"
            )
        assert quant is not None
        key = name.rpartition(".")[0]
        parts = self.awq_parts.setdefault(key, {})
        parts[match["param"]] = tensor
        if len(parts) < len(_AWQ_PARAMS):
            return
        del self.awq_parts[key]
        if not self.warned_awq:
            self.warned_awq = True
            dtype = self.model.lm_head_weight().dtype
            logger.warning(
                "AWQ experts are dequantized to %s at load time (the 4-bit kernels take no experts)", dtype
            )
        weight = awq_dequantize(parts["qweight"], parts["qzeros"], parts["scales"], int(quant["group_size"]))
        self.copy_expert(match["experts"], int(match["expert"]), match["projection"], weight.t(), key)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral (8 experts, top-2, renormalized): config.moe makes every layer's MLP sparse."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device
    ) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # experts are neither sharded nor reduced across ranks
                raise ValueError(
                    f"{config.architecture}: --tp > 1 is not supported for mixture-of-experts models"
                )
        super().__init__(config, backend, dtype, device)

    def weight_loader(self) -> WeightLoader:
        return MoEWeightLoader(self)
