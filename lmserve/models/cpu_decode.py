"""A Llama-family decode step on the CPU in one C call (kernels/cpu/decode_step.c).

With the C kernels a one-stream decode step of SmolLM2 still made ~490 torch dispatches and ~210 ctypes calls,
16 a layer: each costs 1-8 us, together ~2-3 ms of a ~9 ms step, as much as the 4-bit weights take to stream.
Where every layer is the plain Llama one on 4-bit-exact weights (a GGUF Q4_x checkpoint in bf16, the CPU's
default), a step of 1-16 sequences with one new token each runs all layers and the final norm in one call: the
same kernels in the same order as the per-op path, so the same bits (tests/unit/test_cpu_decode_step.py), in
one OpenMP region. Anything else (prefill, > 16 rows, LoRA, biases, q/k norms, MoE, tp, other dtypes) keeps the
per-op path; LMSERVE_CPU_DECODE_STEP=0 turns it off.

The per-layer arguments (weight and cache pointers) are built once per KV-cache list; the model's modules and
weights are fixed after the engine is built (adapters are attached and weights loaded before the first step).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from lmserve.attention.torch_backend import CPUAttentionBackend, TorchPlan
from lmserve.distributed.parallel_state import tp_size
from lmserve.kernels import cpu_native
from lmserve.layers.activation import gated_activation
from lmserve.layers.linear import Linear
from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RopeInputs

if TYPE_CHECKING:
    from lmserve.models.llama import LlamaModel

DECODE_STEP_ENV = "LMSERVE_CPU_DECODE_STEP"
"""Set to 0 to run a CPU decode step op by op (the A/B baseline)."""


class CPUDecodeStep:
    """The C call's arguments for one model and KV-cache list; `run` does a step or says it cannot (None)."""

    def __init__(self, model: LlamaModel, kv_caches: list[Any]) -> None:
        self.kv_caches = kv_caches
        layers: list[Any] = list(model.layers)  # LlamaDecoderLayer, checked by supported()
        attention = layers[0].self_attn
        cache = kv_caches[0]
        _, num_kv_heads, num_blocks, block_size, head_dim = cache.shape
        self.shape = cpu_native.ModelShape(
            model.norm.weight.shape[0],
            attention.num_heads,
            num_kv_heads,
            head_dim,
            layers[0].mlp.down_proj.in_features,
            num_blocks,
            block_size,
            model.norm.eps,
            attention.scale,
        )
        self.input_norm: RMSNorm = layers[0].input_layernorm
        self.final_norm = model.norm._float_weight()
        self.layers = (cpu_native.DecodeLayer * len(layers))()
        self.max_rows = cpu_native.GEMM_MAX_ROWS
        """Up to 4 rows the linears' GEMV copies, up to 16 their GEMM copies (where every linear has one)."""
        self.keep: list[torch.Tensor] = [self.final_norm]  # what the pointers point into
        for entry, layer, layer_cache in zip(self.layers, layers, kv_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            linears = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
            entry.qkv, entry.o, entry.gate_up, entry.down = (
                cpu_native.q4_weight(linear.q4, linear.q4_panels) for linear in linears
            )
            if any(linear.q4_panels is None for linear in linears):
                self.max_rows = cpu_native.MAX_ROWS
            norms = layer.input_layernorm._float_weight(), layer.post_attention_layernorm._float_weight()
            entry.input_norm, entry.post_norm = norms[0].data_ptr(), norms[1].data_ptr()
            entry.cache = layer_cache.data_ptr()
            entry.window = attn.sliding_window or 0
            self.keep.extend(norms)

    @staticmethod
    def supported(model: LlamaModel, kv_caches: list[Any]) -> bool:
        """Whether every layer is one the C step computes exactly as the per-op path (checked once)."""
        from lmserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel

        if (
            os.environ.get(DECODE_STEP_ENV, "1") == "0"
            or type(model) is not LlamaModel
            or tp_size() != 1
            or not kv_caches
            or len(kv_caches) != len(model.layers)
            or model.rotary.cos_sin_cache is not None
            or model.rotary.cos_cache.dtype != torch.bfloat16
            or not _plain_norm(model.norm)
            or not cpu_native.kernel_available()
        ):
            return False
        silu = gated_activation("silu")
        first_cache = kv_caches[0]
        for layer, layer_cache in zip(model.layers, kv_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            if (
                type(layer) is not LlamaDecoderLayer
                or type(attn) is not LlamaAttention
                or type(mlp) is not LlamaMLP
                or not isinstance(attn.backend, CPUAttentionBackend)
                or attn.q_norm is not None
                or mlp.act_and_mul is not silu
                or not all(map(_plain_q4, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)))
                or not (_plain_norm(layer.input_layernorm) and _plain_norm(layer.post_attention_layernorm))
                or not isinstance(layer_cache, torch.Tensor)
                or layer_cache.dtype != torch.bfloat16
                or layer_cache.dim() != 5
                or layer_cache.shape != first_cache.shape
                or not layer_cache.is_contiguous()
                or layer_cache.shape[-1] != attn.head_dim
                or model.rotary.cos_cache.shape[-1] != attn.head_dim
            ):
                return False
        return True

    def run(self, hidden: torch.Tensor, rope: RopeInputs, plan: Any) -> torch.Tensor | None:
        """The final norm's output [B, H] for the step's embeddings hidden [B, H], or None when this step is not
        one the C call takes (the caller runs the layers op by op)."""
        if not isinstance(plan, TorchPlan) or rope.cos is None or rope.sin is None:
            return None
        meta = plan.meta
        num_rows = hidden.shape[0]
        if (
            not meta.is_decode_only
            or meta.num_tokens != num_rows
            or num_rows > self.max_rows
            or hidden.dtype != torch.bfloat16
            or meta.block_tables.dtype != torch.int32
            or meta.seq_lens.dtype != torch.int32
            or rope.cos.dtype != torch.bfloat16
        ):
            return None
        block_tables = meta.block_tables
        if block_tables.stride(-1) != 1:
            block_tables = block_tables.contiguous()
        hidden = hidden.contiguous()
        slots = meta.slot_mapping
        if slots.dtype != torch.int64 or not slots.is_contiguous():
            slots = slots.long().contiguous()
        return cpu_native.decode_step(
            self.layers,
            self.shape,
            self.input_norm(hidden),
            hidden,
            self.final_norm,
            rope.cos.contiguous(),
            rope.sin.contiguous(),
            slots,
            block_tables,
            meta.seq_lens.contiguous(),
        )


def _plain_q4(linear: Any) -> bool:
    return type(linear) is Linear and linear.q4 is not None and linear.bias is None


def _plain_norm(norm: Any) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16


def decode_step_for(model: LlamaModel, kv_caches: list[Any]) -> CPUDecodeStep | None:
    """The model's C decode step for these caches (decided and built on first use, again for another cache
    list), or None where it does not apply."""
    cached = model.__dict__.get("_cpu_decode_step")
    if cached is not None and cached[0] is kv_caches:
        return cached[1]
    step = CPUDecodeStep(model, kv_caches) if CPUDecodeStep.supported(model, kv_caches) else None
    model.__dict__["_cpu_decode_step"] = (kv_caches, step)
    return step
