"""Mixtral: the Llama decoder with a sparse MoE MLP, and the loader of expert tensors into stacked parameters.

Expert tensors arrive in any of these layouts, each copied straight into its slice of the stacked
`mlp.experts.gate_up_proj` [E, 2I, H] / `mlp.experts.down_proj` [E, H, I] (no per-layer buffering):
- per expert (HF checkpoints): Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2`, Qwen3-MoE
  `mlp.experts.{e}.gate_proj|up_proj|down_proj`; AutoAWQ ones as qweight/qzeros/scales, dequantized here;
- stacked per projection (GGUF `ffn_gate_exps` ...): `mlp.experts.gate_proj|up_proj|down_proj.weight` [E, out, in];
- stacked as the model holds them (transformers 5's state dict): `mlp.experts.gate_up_proj` / `down_proj`.

Under tp (see layers/moe.py) a rank reads only its part of each expert (`weight_slice`): the rows of gate and
up, the columns of down (AWQ: the packed columns / whole groups of rows). A stacked `gate_up_proj` is the one
exception: its rank's rows are two runs, so it is read whole and cut here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.distributed.parallel_state import tp_rank, tp_size
from lmserve.distributed.sharding import TensorSlice, part
from lmserve.layers.moe import local_intermediate_size
from lmserve.layers.quant_formats import awq_dequantize, quant_method
from lmserve.models.config import ModelConfig
from lmserve.models.llama import LlamaForCausalLM, WeightLoader, check_whole_groups

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
_STACKED_GATE_UP, _STACKED_DOWN = ".experts.gate_up_proj", ".experts.down_proj"


def expert_slice(match: re.Match[str], shape: tuple[int, ...], name: str) -> TensorSlice:
    """This rank's part of an expert tensor: output rows of gate/up, input columns of down.

    Float weights are [out, in] (or [E, out, in]); AutoAWQ's qweight/qzeros/scales are [in (or groups), out
    (or out / 8 packed)], so their dims are the other way round.
    """
    _, half = EXPERT_PROJECTIONS[match["projection"]]
    output_dim, input_dim = (len(shape) - 2, len(shape) - 1) if match["param"] == "weight" else (1, 0)
    dim = input_dim if half is None else output_dim
    return part(shape, dim, tp_rank(), 1, tp_size(), name)


def local_gate_up(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's rows of a stacked gate_up_proj [E, 2I, H]: its part of the gate half, then of the up half."""
    if tp_size() == 1:
        return tensor
    halves = tensor.chunk(2, dim=-2)
    return torch.cat([part(h.shape, 1, tp_rank(), 1, tp_size(), name).of(h) for h in halves], dim=-2)


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
            if name.endswith(_STACKED_GATE_UP):
                tensor = local_gate_up(tensor, name)
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
        if config.moe is not None:  # AWQ experts are cut by whole groups of their down_proj's inputs
            local = local_intermediate_size(config.moe.intermediate_size)
            check_whole_groups(local, config.quantization_config, "the experts' down_proj")
        super().__init__(config, backend, dtype, device)

    def weight_loader(self) -> WeightLoader:
        return MoEWeightLoader(self)

    def weight_slice(self, name: str, shape: tuple[int, ...]) -> TensorSlice | None:
        """Expert tensors by expert_slice (a stacked gate_up_proj whole, see the module docstring); the rest as
        Llama's. The router is replicated."""
        if tp_size() == 1:
            return None
        match = _EXPERT_TENSOR.fullmatch(name)
        if match is not None and match["projection"] in EXPERT_PROJECTIONS:
            return expert_slice(match, shape, name)
        if name.endswith(_STACKED_DOWN):  # [E, H, I]: this rank's input columns
            return part(shape, 2, tp_rank(), 1, tp_size(), name)
        if name.endswith(_STACKED_GATE_UP):
            return None
        return super().weight_slice(name, shape)
