"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama): one class, config switches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.attention.backend import AttentionBackend
from lmserve.distributed.parallel_state import all_reduce, gather_to_first, tp_rank, tp_size
from lmserve.distributed.sharding import TensorSlice, head_layout, padded_vocab_size, part
from lmserve.kernels import cpu_native, gemv
from lmserve.kernels.fp8 import Fp8Activation, fp8_linear, quantize_rows_fp8
from lmserve.kernels.gemv import one_row_logits
from lmserve.layers.activation import fp8_gated_activation, gated_activation
from lmserve.layers.cpu_gemm import pack_weight, packable, packed_linear
from lmserve.layers.embedding import VocabEmbedding
from lmserve.layers.fp8 import wants_fp8_activation
from lmserve.layers.linear import (
    INT4_MAX_ROWS,
    Linear,
    input_dims_of,
    int8_linear,
    make_linear,
    output_dims_of,
    pack_int8,
)
from lmserve.layers.norm import RMSNorm
from lmserve.layers.quant_formats import quant_method
from lmserve.layers.rotary import RopeInputs, RotaryEmbedding, rotate_qk
from lmserve.models.config import ModelConfig
from lmserve.models.cpu_decode import decode_step_for

# HF projection name -> (our fused module, shard index, number of shards)
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0, 3),
    "k_proj": ("qkv_proj", 1, 3),
    "v_proj": ("qkv_proj", 2, 3),
    "gate_proj": ("gate_up_proj", 0, 2),
    "up_proj": ("gate_up_proj", 1, 2),
}
ROW_PARALLEL = ("o_proj", "down_proj")
"""Projections split by input features under tp: each rank's partial sums meet in one all-reduce."""
VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")


@contextlib.contextmanager
def default_dtype_and_device(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Build modules straight into dtype/device (no float32 CPU detour, no init of weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


class LlamaAttention(nn.Module):
    """Fused QKV projection, optional per-head q/k norms (Qwen3), RoPE, paged attention, output projection.

    Under tp the rank holds its heads only: num_heads and num_kv_heads are this rank's counts (subclasses
    read them), qkv_proj is column-parallel and o_proj row-parallel with one all-reduce.
    """

    head_norm_class: type[nn.Module] = RMSNorm
    """The q/k norm when config.qk_norm (Gemma 3 overrides it with its (1 + w) norm)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, layer_index: int = 0) -> None:
        super().__init__()
        self.backend = backend
        layout = head_layout(config.num_attention_heads, config.num_key_value_heads, tp_rank(), tp_size())
        self.num_heads = layout.num_heads
        self.num_kv_heads = layout.num_kv_heads
        self.first_kv_head = layout.first_kv_head
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = config.attention_scale
        self.sliding_window = config.layer_sliding_window(layer_index)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = self.head_norm_class(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.head_norm_class(self.head_dim, config.rms_norm_eps)
        quant = config.quantization_config
        self.qkv_proj = make_linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias, quant
        )
        check_whole_groups(self.q_size, quant, "o_proj")
        self.o_proj = make_linear(self.q_size, config.hidden_size, config.o_proj_bias, quant)

    def forward(
        self, hidden: torch.Tensor | Fp8Activation, rope: RopeInputs, kv_cache: Any, attn_plan: Any
    ) -> torch.Tensor:
        """hidden [T, H] normed; an Fp8Activation (already quantized) when wants_fp8_activation(qkv_proj, T)."""
        return self.attend(self.qkv_proj(hidden), rope, kv_cache, attn_plan)

    def attend(self, qkv: torch.Tensor, rope: RopeInputs, kv_cache: Any, attn_plan: Any) -> torch.Tensor:
        """The block after its qkv projection: q/k norms, RoPE, paged attention, o_proj."""
        num_tokens = qkv.shape[0]
        qk = self.qk_heads(qkv)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        table = rope.cos_sin_cache
        if self.backend.fuses_rotary and (table is None or table.shape[1] == self.head_dim):
            # the rotation rides in the KV-cache store (CUDA: one Triton kernel; CPU: one C call where it runs)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            out = self.backend.forward(  # type: ignore[call-arg]
                q, k, v, kv_cache, attn_plan, self.scale, self.sliding_window, rope=rope
            )
        else:
            # q and k rotate together: one rope pass over Hq + Hkv heads
            q, k = rotate_qk(qk, self.num_heads, rope)
            out = self.backend.forward(q, k, v, kv_cache, attn_plan, self.scale, self.sliding_window)
        return all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))

    def qk_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """q and k heads [T, Hq + Hkv, D] of the fused projection, each head normed when the model has q/k norms."""
        num_tokens = qkv.shape[0]
        if self.q_norm is None or self.k_norm is None:
            return qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim)
        q = self.q_norm(qkv[:, : self.q_size].reshape(num_tokens, self.num_heads, self.head_dim))
        k = self.k_norm(
            qkv[:, self.q_size : self.q_size + self.kv_size].reshape(num_tokens, -1, self.head_dim)
        )
        return torch.cat([q, k], dim=1)


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one projection (act: config.hidden_act); under tp
    each rank holds intermediate_size / tp of the features (gate_up column-, down row-parallel, one all-reduce)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        quant = config.quantization_config
        tp = tp_size()
        if config.intermediate_size % tp:
            raise ValueError(f"--tp {tp} must divide intermediate_size={config.intermediate_size}")
        intermediate = config.intermediate_size // tp
        self.gate_up_proj = make_linear(config.hidden_size, 2 * intermediate, config.mlp_bias, quant)
        check_whole_groups(intermediate, quant, "down_proj")
        self.down_proj = make_linear(intermediate, config.hidden_size, config.mlp_bias, quant)
        self.act_and_mul = gated_activation(config.hidden_act)
        self.act_and_mul_fp8 = fp8_gated_activation(config.hidden_act)
        self.silu_gated = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """x [T, H] normed; an Fp8Activation when wants_fp8_activation(gate_up_proj, T)."""
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The block after its gate_up projection: the activation and the down projection."""
        # a down projection that makes silu(gate) * up itself where it can (one row on CUDA: the W4A16 GEMV);
        # looked up per call, since a LoRA wrapper may replace down_proj after construction
        silu_down = getattr(self.down_proj, "silu_gated_forward", None) if self.silu_gated else None
        fused = silu_down(gate_up) if silu_down is not None else None
        if fused is not None:
            return all_reduce(fused)
        if self.act_and_mul_fp8 is not None and wants_fp8_activation(self.down_proj, gate_up.shape[0]):
            return all_reduce(self.down_proj(self.act_and_mul_fp8(gate_up)))
        return all_reduce(self.down_proj(self.act_and_mul(gate_up)))


def make_mlp(config: ModelConfig, layer_index: int) -> nn.Module:
    """The MLP of one layer: dense, or a sparse mixture of experts on an MoE model's sparse layers."""
    moe = config.moe
    if moe is None or not moe.is_sparse_layer(layer_index):
        return LlamaMLP(config)
    from lmserve.layers.moe import SparseMoeBlock

    return SparseMoeBlock(
        config.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k, moe.renormalize
    )


def check_whole_groups(local_inputs: int, quant_config: dict[str, Any] | None, name: str) -> None:
    """A row-parallel AWQ rank must hold whole quantization groups (they run along the input features)."""
    if tp_size() == 1 or quant_method(quant_config) != "awq":
        return
    assert quant_config is not None
    group_size = int(quant_config["group_size"])
    if local_inputs % group_size:
        raise ValueError(
            f"--tp {tp_size()}: {name} gets {local_inputs} input features per rank, not a whole number of "
            f"AWQ groups of {group_size}; use a --tp that splits the groups evenly"
        )


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual stream is carried separately between layers."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, layer_index: int = 0) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, backend, layer_index)
        self.mlp = make_mlp(config, layer_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeInputs,
        kv_cache: Any,
        attn_plan: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # an FP8 projection that quantizes its input per token gets it from the norm's kernel, quantized there
        num_tokens = hidden.shape[0]
        fp8 = wants_fp8_activation(self.self_attn.qkv_proj, num_tokens)
        fused = (
            None
            if residual is None
            else add_norm_linear(self.self_attn.qkv_proj, self.input_layernorm, hidden, residual)
        )
        if fused is not None:  # the add and norm inside the qkv projection's launch (one row on CUDA)
            qkv, residual = fused
            hidden = self.self_attn.attend(qkv, rope, kv_cache, attn_plan)
        else:
            if residual is None:
                residual, normed = hidden, self.input_layernorm(hidden, fp8=fp8)
            else:
                normed, residual = self.input_layernorm.add_forward(hidden, residual, fp8=fp8)
            hidden = self.self_attn(normed, rope, kv_cache, attn_plan)
        if isinstance(self.mlp, LlamaMLP):
            fused = add_norm_linear(self.mlp.gate_up_proj, self.post_attention_layernorm, hidden, residual)
            if fused is not None:
                gate_up, residual = fused
                return self.mlp.down(gate_up), residual
        fp8 = isinstance(self.mlp, LlamaMLP) and wants_fp8_activation(self.mlp.gate_up_proj, num_tokens)
        normed, residual = self.post_attention_layernorm.add_forward(hidden, residual, fp8=fp8)
        return self.mlp(normed), residual


def add_norm_linear(
    linear: nn.Module, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(linear(norm(x + residual)), x + residual) from one launch where the linear takes the residual add and the
    RMSNorm into its own kernel (`add_norm_forward`: one row on CUDA, LMSERVE_DECODE_FUSION=norm), else None. The
    new residual is a new tensor; a LoRA-wrapped linear (no add_norm_forward) norms first. The switch is read here,
    once for every linear that can fuse, so a step with the fusion off pays one attribute read per norm."""
    if not gemv.FUSE_NORM:
        return None
    fused = getattr(linear, "add_norm_forward", None)
    if fused is None or type(norm) is not RMSNorm:
        return None
    return fused(x, residual, norm.weight, norm.eps)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[Any], attn_plan: Any
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.prepare(positions)  # once per step, shared by every layer
        if not hidden.is_cuda:  # CPU: a decode step of few sequences may run all layers in one C call
            step = decode_step_for(self, kv_caches)
            out = None if step is None else step.run(hidden, rope, attn_plan)
            if out is not None:
                return out
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rope, kv_cache, attn_plan)
        assert residual is not None
        return self.norm.add_forward(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The CausalLM contract: forward -> hidden [T, H], compute_logits -> float32 [N, V], load_weights."""

    model_class: type[nn.Module] = LlamaModel
    """The decoder stack under `model.` (Gemma 3 swaps in its own)."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = backend
        with default_dtype_and_device(dtype, device):
            self.model: Any = self.model_class(config, backend)  # LlamaModel or a subclass's own stack
            rows_per_rank = padded_vocab_size(config.vocab_size, tp_size()) // tp_size()
            self.lm_head = (
                None if config.tie_word_embeddings else Linear(config.hidden_size, rows_per_rank, False)
            )
        # CPU bfloat16 decode: an int8 copy of the lm_head for few-row batches (set by load_weights)
        self.lm_head_int8: tuple[torch.Tensor, torch.Tensor] | None = None
        # CPU: oneDNN's blocked copy of a tied lm_head (the embedding) for more rows (set by pack_lm_head)
        self.lm_head_onednn: torch.Tensor | None = None
        # --lm-head-fp8: (e4m3 weight [V, H], float32 scale [V, 1]); set by quantize_lm_head_fp8
        self.lm_head_fp8: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[Any],
        attn_plan: Any,
    ) -> torch.Tensor:
        """input_ids/positions [T] int64 of a flat ragged batch -> final hidden states [T, H].

        attn_plan is `attention_backend.prepare(metadata)` of the step, shared by every layer.
        """
        return self.model(input_ids, positions, kv_caches, attn_plan)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V] (lm_head, or the embedding when tied).

        Under tp (vocabulary-parallel lm_head) every rank computes its rows' logits and rank 0, which
        samples, gathers them; the other ranks get their own rows back and drop them.
        """
        fp8 = self.lm_head_fp8
        gemv_logits = (
            one_row_logits(hidden, self.lm_head_weight()) if hidden.is_cuda and fp8 is None else None
        )
        if fp8 is not None:  # --lm-head-fp8: the FP8 GEMV (<= 16 rows) or GEMM; the widened weight off CUDA
            logits = fp8_linear(hidden, *fp8, None)
        elif gemv_logits is not None:  # CUDA, one row: float32 logits straight from the GEMV
            logits = gemv_logits
        elif self.lm_head_int8 is not None and hidden.shape[0] <= INT4_MAX_ROWS:
            # the C kernel's float32 logits where it runs (kernels/cpu_native.py), else torch's bf16 ones
            native = cpu_native.int8_logits(hidden, *self.lm_head_int8)
            logits = int8_linear(hidden, self.lm_head_int8) if native is None else native
        elif self.lm_head is not None:
            logits = self.lm_head(hidden)
        elif self.lm_head_onednn is not None:
            logits = packed_linear(hidden, self.lm_head_onednn)
        else:
            logits = F.linear(hidden, self.lm_head_weight())
        if tp_size() == 1:
            return logits.float()
        return gather_to_first(logits, dim=-1)[:, : self.config.vocab_size].float()

    def lm_head_weight(self) -> torch.Tensor:
        if self.lm_head_fp8 is not None and not self.config.tie_word_embeddings:
            raise RuntimeError("the 16-bit lm_head was replaced by its FP8 copy (--lm-head-fp8)")
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def quantize_lm_head_fp8(self, rows_per_chunk: int = 8192) -> None:
        """--lm-head-fp8: the lm_head (or the tied embedding) as e4m3 with one float32 scale per vocabulary row
        (quantize_rows_fp8, chunks of rows_per_chunk to bound the float32 temporaries). An untied 16-bit lm_head
        and its CPU copies are dropped; a tied embedding stays for the token lookup."""
        weight = self.lm_head_weight()
        chunks = [quantize_rows_fp8(part) for part in weight.detach().split(rows_per_chunk)]
        self.lm_head_fp8 = (torch.cat([q for q, _ in chunks]), torch.cat([scale for _, scale in chunks]))
        self.lm_head = None  # untied: freed (lm_head_weight refuses from now on); tied: it was None already
        self.lm_head_int8 = self.lm_head_onednn = None

    def pack_lm_head(self) -> None:
        """A tied lm_head's oneDNN copy (layers/cpu_gemm.py; an untied one is a Linear, packed with the rest)."""
        if self.lm_head_fp8 is not None:
            return
        weight = self.lm_head_weight()
        if self.lm_head is None and self.lm_head_onednn is None and packable(weight):
            self.lm_head_onednn = pack_weight(weight)

    def weight_loader(self) -> WeightLoader:
        """What routes checkpoint tensors onto the parameters (MoE models also route expert tensors)."""
        return WeightLoader(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in; q/k/v and gate/up are concatenated into the fused projections."""
        self.weight_loader().load(weights)
        weight = self.lm_head_weight()
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            # the biggest matrix of a small model, read whole for every decoded token: torch's bf16 GEMV
            # is compute-bound on the CPU, its int8 weight-only kernel reads half the bytes and is ~4x faster
            self.lm_head_int8 = pack_int8(weight, weight.dtype)

    def weight_slice(self, name: str, shape: tuple[int, ...]) -> TensorSlice | None:
        """The part of checkpoint tensor `name` (HF name, full `shape`) this tp rank keeps; None = all of it."""
        if tp_size() == 1:
            return None
        if name in VOCAB_PARALLEL:
            embedding = self.model.embed_tokens
            return TensorSlice(0, embedding.first_row, min(embedding.stop_row, self.config.vocab_size))
        module_path, _, param = name.rpartition(".")
        parent, _, projection = module_path.rpartition(".")
        if projection in FUSED_PROJECTIONS:
            return self.column_slice(parent, projection, param, shape)
        if projection in ROW_PARALLEL:
            dim = input_dims_of(self.get_submodule(module_path)).get(param)
            return None if dim is None else part(shape, dim, tp_rank(), 1, tp_size(), name)
        return None

    def column_slice(self, parent: str, projection: str, param: str, shape: tuple[int, ...]) -> TensorSlice:
        """This rank's output features of q/k/v (by heads) or gate/up (by tp)."""
        fused, _, _ = FUSED_PROJECTIONS[projection]
        dim = output_dims_of(self.get_submodule(f"{parent}.{fused}"))[param]
        name = f"{parent}.{projection}.{param}"
        if fused == "gate_up_proj":
            return part(shape, dim, tp_rank(), 1, tp_size(), name)
        attention = self.get_submodule(parent)
        assert isinstance(attention, LlamaAttention)
        if projection == "q_proj":
            num = attention.num_heads
            return part(shape, dim, tp_rank() * num, num, self.config.num_attention_heads, name)
        return part(
            shape, dim, attention.first_kv_head, attention.num_kv_heads, self.config.num_key_value_heads, name
        )


class WeightLoader:
    """Routes HF-named tensors onto a LlamaForCausalLM's parameters, fusing shards, and checks completeness."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.targets = model.state_dict(keep_vars=True)
        self.pending: dict[str, dict[int, torch.Tensor]] = {}
        self.loaded: set[str] = set()

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            self.load_one(name, tensor)
        if self.pending:
            raise ValueError(
                f"incomplete fused weights (some of q/k/v or gate/up missing): {sorted(self.pending)}"
            )
        missing = sorted(set(self.targets) - self.loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights: {missing}")

    def load_one(self, name: str, tensor: torch.Tensor) -> None:
        if name.startswith("lm_head.") and self.model.lm_head is None:
            return  # tied checkpoints may still store lm_head; HF ignores it too
        module_path, _, param = name.rpartition(".")
        parent, _, projection = module_path.rpartition(".")
        if projection not in FUSED_PROJECTIONS:
            self.copy(name, tensor, name)
            return
        fused, shard, num_shards = FUSED_PROJECTIONS[projection]
        target = f"{parent}.{fused}.{param}"
        shards = self.pending.setdefault(target, {})
        shards[shard] = tensor
        if len(shards) == num_shards:
            del self.pending[target]
            dim = output_dims_of(self.model.get_submodule(f"{parent}.{fused}"))[param]
            self.copy(target, torch.cat([shards[i] for i in range(num_shards)], dim=dim), name)

    def copy(self, target: str, tensor: torch.Tensor, source: str) -> None:
        param = self.targets.get(target)
        if param is None:
            raise ValueError(f"unexpected weight {source!r}: the model has no parameter {target!r}")
        if target in VOCAB_PARALLEL and tensor.shape[0] < param.shape[0]:
            tensor = pad_vocab_rows(tensor, param.shape[0])
        if target.endswith(".bias") and target.split(".")[-2] in ROW_PARALLEL and tp_rank() > 0:
            tensor = torch.zeros_like(tensor)  # row-parallel partial sums are all-reduced: add the bias once
        if param.shape != tensor.shape:
            raise ValueError(
                f"weight {source!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor)
        self.loaded.add(target)
        module_path, _, name = target.rpartition(".")
        module = self.model.get_submodule(module_path)
        if name == "weight" and isinstance(module, Linear):
            module.keep_int4_if_exact(tensor)  # from the checkpoint's values, before rounding to bf16


def pad_vocab_rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    """This rank's vocabulary rows padded with zero rows (the padding past vocab_size under tp)."""
    return torch.cat([tensor, tensor.new_zeros(num_rows - tensor.shape[0], *tensor.shape[1:])])
