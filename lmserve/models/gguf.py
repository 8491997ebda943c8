"""GGUF files (llama.cpp): metadata to ModelConfig, and tensors renamed to HF names and dequantized."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.models.config import ModelConfig, MoEConfig
from lmserve.models.gguf_file import Q4_1, Q8_0, GGUFFile, GGUFTensor, ggml_type_info, read_gguf_file

Weights = np.ndarray | torch.Tensor
"""Tensor values in numpy (gguf-py dequantized) or torch (our Q4_1 / Q8_0 dequantization)."""

GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
"""llama.cpp `general.architecture` -> HF architecture name, for the GGUF files we read."""

# llama.cpp's convert_hf_to_gguf.py permutes the q/k rows of these architectures only
# (interleaved rotary pairs); Qwen2 is stored in HF order.
_ROPE_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_TENSOR_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixture of experts: the router, and each projection of all experts stacked [E, out, in]
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Tensors llama.cpp derives from the config; the model recomputes them.
_SKIPPED_TENSORS = ("rope_freqs.weight",)
_QK_NORM_TENSOR_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Per-architecture names that differ from the table above (Gemma 3: four norms per block, q/k norms).
_ARCH_LAYER_TENSOR_NAMES = {
    "qwen3": _QK_NORM_TENSOR_NAMES,
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        **_QK_NORM_TENSOR_NAMES,
    },
}
# llama.cpp stores Gemma's (1 + w) norm weights with the 1 added; HF's checkpoints (and our model) hold w.
_NORM_PLUS_ONE_ARCHITECTURES = ("gemma3",)
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: str | Path) -> GGUFFile:
    """The GGUF file parsed once per process (memory-mapped); a missing or unreadable file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return read_gguf_file(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error


def read_field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """The value of metadata `key` (scalar, string or list), or `default` when absent."""
    return reader.get(key, default)


def gguf_architecture(reader: GGUFFile, path: str | Path) -> str:
    """llama.cpp's architecture name; ValueError when we cannot read it as a model."""
    arch = read_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported GGUF architectures: {sorted(GGUF_ARCHITECTURES)}"
        )
    return str(arch)


def gguf_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata (weights are dequantized, so dtype is float32)."""
    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    meta = _ArchFields(reader, arch, path)
    hidden_size = meta.required("embedding_length")
    num_heads = meta.required("attention.head_count")
    tensor_names = {tensor.name for tensor in reader.tensors}
    return ModelConfig(
        architecture=_hf_architecture(reader, arch),
        vocab_size=_vocab_size(reader, meta),
        hidden_size=hidden_size,
        intermediate_size=meta.required("feed_forward_length"),
        num_hidden_layers=meta.required("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=meta.get("attention.head_count_kv", num_heads),
        head_dim=_head_dim(meta, hidden_size // num_heads),
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta),
        max_position_embeddings=meta.get("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        torch_dtype="float32",
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_token_ids(reader),
        moe=_moe_config(meta),
        **({"qk_norm": "blk.0.attn_q_norm.weight" in tensor_names} | _arch_config_fields(arch, meta)),
    )


def iter_gguf_weights(path: str | Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every GGUF tensor, dequantized once and q/k rows un-permuted."""
    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    permuted = arch in _ROPE_PERMUTED_ARCHITECTURES
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED_TENSORS:
            continue
        hf_name = hf_tensor_name(tensor.name, path, arch)
        weights = dequantize_tensor(tensor)
        if permuted:
            weights = _unpermute_qk(weights, hf_name, config)
        if arch in _NORM_PLUS_ONE_ARCHITECTURES and "norm." in hf_name:
            weights = weights - 1.0
        yield hf_name, _to_float32_tensor(weights)


def dequantize_tensor(tensor: GGUFTensor) -> Weights:
    """float32 values of a GGUF tensor: Q4_1 and Q8_0 vectorized in torch (~10x gguf-py's numpy), others by gguf-py."""
    dequantize_blocks = _TORCH_DEQUANTIZERS.get(tensor.tensor_type)
    if dequantize_blocks is None:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
    block_bytes = ggml_type_info(tensor.tensor_type, tensor.name)[2]
    blocks = torch.from_numpy(tensor.data.copy()).view(-1, block_bytes)  # a copy: the map is read-only
    return dequantize_blocks(blocks).reshape(tensor.shape)


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1 block: fp16 scale d, fp16 minimum m, 16 bytes of codes (low nibbles = values 0-15, high = 16-31)."""
    scale, minimum = blocks[:, 0:2].view(torch.float16).float(), blocks[:, 2:4].view(torch.float16).float()
    codes = blocks[:, 4:]
    return torch.cat([codes & 0xF, codes >> 4], dim=1).float() * scale + minimum


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 block: fp16 scale d, 32 int8 codes."""
    return blocks[:, 2:].view(torch.int8).float() * blocks[:, 0:2].view(torch.float16).float()


_TORCH_DEQUANTIZERS = {Q4_1: _dequantize_q4_1, Q8_0: _dequantize_q8_0}


def hf_tensor_name(gguf_name: str, path: str | Path = "<gguf>", arch: str = "llama") -> str:
    """llama.cpp tensor name -> HF name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSOR_NAMES:
        return f"{_GLOBAL_TENSOR_NAMES[base]}.{suffix}"
    names = {**_LAYER_TENSOR_NAMES, **_ARCH_LAYER_TENSOR_NAMES.get(arch, {})}
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in names:
        raise ValueError(f"{path}: GGUF tensor {gguf_name!r} has no HF counterpart we know")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{names[kind]}.{suffix}"


def unpermute_rope_rows(weights: Weights, num_heads: int) -> Weights:
    """Undo llama.cpp's q/k permutation (as transformers' LlamaTensorProcessor does); numpy or torch."""
    half_head_dim = weights.shape[0] // num_heads // 2
    rows = weights.reshape(num_heads, half_head_dim, 2, *weights.shape[1:])
    return rows.swapaxes(2, 1).reshape(weights.shape)


def _unpermute_qk(weights: Weights, hf_name: str, config: ModelConfig) -> Weights:
    if ".self_attn.q_proj." in hf_name:
        return unpermute_rope_rows(weights, config.num_attention_heads)
    if ".self_attn.k_proj." in hf_name:
        return unpermute_rope_rows(weights, config.num_key_value_heads)
    return weights


def _to_float32_tensor(weights: Weights) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        return weights.contiguous()
    # F32 tensors come back as read-only views of the memory map; torch needs its own copy.
    array = np.asarray(weights, dtype=np.float32)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


class _ArchFields:
    """`{arch}.*` metadata of one GGUF file, with errors naming the file and key."""

    def __init__(self, reader: GGUFFile, arch: str, path: str | Path) -> None:
        self.reader, self.arch, self.path = reader, arch, path

    def get(self, key: str, default: Any = None) -> Any:
        return read_field(self.reader, f"{self.arch}.{key}", default)

    def required(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata {self.arch}.{key} is missing")
        return int(value)


def _hf_architecture(reader: GGUFFile, arch: str) -> str:
    # llama.cpp stores Mistral as "llama"; transformers tells them apart by general.name too.
    name = str(read_field(reader, "general.name", "")).lower()
    if arch == "llama" and read_field(reader, "llama.expert_count", 0):
        return "MixtralForCausalLM"  # llama.cpp stores Mixtral as "llama" with experts
    if arch == "llama" and "mistral" in name:
        return "MistralForCausalLM"
    return GGUF_ARCHITECTURES[arch]


def _moe_config(meta: _ArchFields) -> MoEConfig | None:
    """Experts from `{arch}.expert_*` metadata (llama.cpp renormalizes the top-k of both Mixtral and Qwen3-MoE)."""
    num_experts = meta.get("expert_count", 0)
    if not num_experts:
        return None
    return MoEConfig(
        num_experts=int(num_experts),
        top_k=meta.required("expert_used_count"),
        intermediate_size=int(meta.get("expert_feed_forward_length") or meta.required("feed_forward_length")),
        renormalize=bool(meta.get("expert_weights_norm", True)),
    )


def _vocab_size(reader: GGUFFile, meta: _ArchFields) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    return meta.required("vocab_size")


def _head_dim(meta: _ArchFields, default: int) -> int:
    for key in ("attention.key_length", "rope.dimension_count"):
        value = meta.get(key)
        if value is not None:
            return int(value)
    return default


def _rope_scaling(meta: _ArchFields) -> dict[str, Any] | None:
    rope_type = meta.get("rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": float(meta.get("rope.scaling.factor", 1.0))}
    original = meta.get("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _arch_config_fields(arch: str, meta: _ArchFields) -> dict[str, Any]:
    """ModelConfig fields only some architectures have; Gemma 3's GGUF omits what llama.cpp hard-codes for it."""
    if arch == "qwen3":
        return {"qk_norm": True}
    if arch != "gemma3":
        return {}
    num_layers, window = meta.required("block_count"), meta.get("attention.sliding_window")
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "qk_norm": True,
        "sliding_window": None if window is None else int(window),
        # llama.cpp's and transformers' fixed pattern: every sixth layer global, the others local
        "layer_types": tuple(
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)
        ),
        "rope_local_theta": 10_000.0,  # Gemma 3's rope_local_base_freq, not stored in the GGUF
        # llama.cpp scales by 1/sqrt(head_dim) (the config's query_pre_attn_scalar for all sizes but 27B)
        "query_pre_attn_scalar": float(meta.get("attention.key_length", 256)),
    }


# llama.cpp's fallback when a GGUF names no end-of-turn token: the first of these control tokens in its vocabulary
# (Gemma's GGUFs store only <eos>, yet its chat turns end with <end_of_turn>)
_END_OF_TURN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>")
_CONTROL_TOKEN = 3  # llama.cpp's token type CONTROL


def _eos_token_ids(reader: GGUFFile) -> tuple[int, ...]:
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [read_field(reader, key) for key in keys]
    if ids[1] is None:
        ids.append(_end_of_turn_by_text(reader))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _end_of_turn_by_text(reader: GGUFFile) -> int | None:
    tokens = read_field(reader, "tokenizer.ggml.tokens") or []
    types = read_field(reader, "tokenizer.ggml.token_type")
    ids = {text: i for i, text in enumerate(tokens) if text in _END_OF_TURN_TEXTS}
    for text in _END_OF_TURN_TEXTS:
        token_id = ids.get(text)
        if token_id is not None and (types is None or types[token_id] == _CONTROL_TOKEN):
            return token_id
    return None
