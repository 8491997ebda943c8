"""LoRA-wrapped linears over stacked adapter weights, and the per-step context that tells them each token's slot."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmserve.attention.metadata import upload
from lmserve.kernels._triton import HAS_TRITON
from lmserve.kernels.lora import lora_dense_masked, lora_expand_masked, lora_triton, slot_mask
from lmserve.layers.linear import INT4_MAX_ROWS, Linear


class LoRAContext:
    """What every LoRA linear of one model shares for the current step: each token's adapter slot.

    Slot 0 is the base model; adapter k (1-based, in load order) is slot k. The runner calls `begin_step`
    before each forward; a step with base tokens only costs the linears nothing.
    """

    def __init__(self, num_adapters: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_adapters = num_adapters
        self.device = device
        self.dtype = dtype
        self.use_triton = device.type == "cuda" and HAS_TRITON
        self.active = False
        self.slots = torch.zeros(0, dtype=torch.int32, device=device)
        self._masks: dict[int, torch.Tensor] = {}

    def begin_step(self, slot_runs: Sequence[tuple[int, int]]) -> None:
        """Set the step's tokens from (slot, number of tokens) runs, in the batch's row order."""
        self.active = any(slot for slot, count in slot_runs if count)
        self._masks = {}
        if self.active:
            slots = [slot for slot, count in slot_runs for _ in range(count)]
            self.slots = upload(slots, torch.int32, self.device)  # pinned on CUDA: no wait for the stream

    def add_update(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
        """y += each token's B (A x), on CUDA by the Triton kernels, elsewhere by the masked dense GEMMs."""
        assert y.shape[0] == self.slots.shape[0], "LoRA slots were set for another batch"
        if self.use_triton:
            lora_triton(y, x, a, bt, self.slots)
        else:
            lora_dense_masked(y, x, a, bt, self._mask(a.shape[1]))

    def expand(self, y: torch.Tensor, shrunk: torch.Tensor, bt: torch.Tensor) -> None:
        """y += each token's B times its shrunk activations (CPU; the shrink came fused with the base GEMM)."""
        lora_expand_masked(y, shrunk, bt, self._mask(bt.shape[1]))

    def _mask(self, rank: int) -> torch.Tensor:
        """The step's slot mask for stacks of this rank (linears of equal rank share it)."""
        mask = self._masks.get(rank)
        if mask is None:
            mask = self._masks[rank] = slot_mask(self.slots, self.num_adapters, rank, self.dtype)
        return mask


class LoRALinear(nn.Module):
    """base(x) plus the low-rank update of each token's adapter; `base` is any linear (plain or quantized).

    For a fused projection (qkv, gate_up) the slices' A matrices are stacked along the rank and B is block
    diagonal, so one shrink and one expand cover all slices.
    """

    def __init__(self, base: nn.Module, a: torch.Tensor, bt: torch.Tensor, context: LoRAContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.lora_a: torch.Tensor
        """[N, R, in_features]: adapter k's A at index k - 1."""
        self.lora_bt: torch.Tensor
        """[N, R, out_features]: adapter k's B transposed, scaled by PEFT's lora_alpha / r."""
        self.register_buffer("lora_a", a, persistent=False)
        self.register_buffer("lora_bt", bt, persistent=False)

        self.fused_weight: torch.Tensor | None = None
        """CPU, plain base: [out + N*R, in], the base weight's rows then every adapter's A (see _fuse_shrink)."""
        self.fused_bias: torch.Tensor | None = None
        self.num_base_outputs = 0
        """Columns of the fused GEMM's output that are the base output (the rest: the shrink)."""
        if not context.use_triton and type(base) is Linear:
            self._fuse_shrink(base, a)

    def _fuse_shrink(self, base: Linear, a: torch.Tensor) -> None:
        """Append every adapter's A to the base weight, so one GEMM gives the base output and the shrink: on the
        CPU a small GEMM costs ~40 us whatever its size (SmolLM2, batch 16), as much as the work of the update.
        The base weight becomes a view of the first rows (no second copy; its few-row 4-bit path is unchanged)."""
        out_features = base.weight.shape[0]
        fused = torch.cat([base.weight.detach(), a.flatten(0, 1)])
        base.weight.data = fused[:out_features]
        self.fused_weight, self.num_base_outputs = fused, out_features
        if base.bias is not None:
            self.fused_bias = torch.cat([base.bias.detach(), a.new_zeros(fused.shape[0] - out_features)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.context.active:
            return self.base(x)
        fused = self.fused_weight
        if fused is not None and (not self.base.has_4bit_copy or x.shape[0] > INT4_MAX_ROWS):
            out = torch.nn.functional.linear(x, fused, self.fused_bias)
            y = out[:, : self.num_base_outputs]
            self.context.expand(y, out[:, self.num_base_outputs :], self.lora_bt)
            return y
        y = self.base(x)
        self.context.add_update(y, x, self.lora_a, self.lora_bt)
        return y
