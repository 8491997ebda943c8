"""Qwen3 (per-head q/k RMSNorm, head_dim from the config) and InternLM3 (Llama names; qkv_bias / bias) logits
against HF transformers on tiny random float32 models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.models.config import ModelConfig
from lmserve.models.loader import iter_weights, load_model_config, resolve_model
from lmserve.models.registry import build_model
from tests.models.model_helpers import hf_config_dict
from tests.models.sliding_helpers import SCENARIOS, check_scenario, tiny_model
from tests.models.test_model_logits import build_ours

ATOL = 1e-4  # float32 end to end; differences are summation order only


@pytest.fixture(scope="module")
def qwen3() -> tuple[Any, Any]:
    hf = tiny_model("qwen3")
    return hf, build_ours(hf)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_qwen3_matches_hf(qwen3: tuple[Any, Any], scenario: str) -> None:
    check_scenario(*qwen3, scenario, ATOL)


def test_qwen3_config_reads_qk_norm_and_head_dim() -> None:
    config = ModelConfig.from_hf_config(hf_config_dict(tiny_model("qwen3")))
    assert config.qk_norm and config.head_dim == 32 and config.sliding_window is None
    assert not config.attention_bias and not config.o_proj_bias


def internlm3_config(hf_llama: Any) -> dict[str, Any]:
    """config.json as InternLM3's remote code writes it (qkv_bias, bias) for the same shapes."""
    c = hf_llama.config
    return {
        "architectures": ["InternLM3ForCausalLM"],
        "model_type": "internlm3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"],
        "rope_scaling": {
            "rope_type": "dynamic",
            "factor": 6.0,
        },  # InternLM3-8B's; plain rope inside the context
        "qkv_bias": True,
        "bias": True,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
    }


@pytest.mark.parametrize("scenario", ["chunked_prefill", "mixed_batch"])
def test_internlm3_matches_hf_llama_with_same_weights(scenario: str) -> None:
    """transformers runs InternLM3 checkpoints as LlamaForCausalLM (its auto mapping): the same weights must agree."""
    hf = tiny_model("internlm3_llama")
    config = ModelConfig.from_hf_config(internlm3_config(hf))
    assert (config.attention_bias, config.o_proj_bias, config.mlp_bias) == (True, True, True)
    ours = build_model(config, TorchAttentionBackend(), torch.float32, torch.device("cpu"))
    ours.load_weights(hf.state_dict().items())
    check_scenario(hf, ours, scenario, ATOL)


def test_qwen3_gguf_matches_hf(tmp_path: Path) -> None:
    """A GGUF written the way llama.cpp converts Qwen3 (gguf-py's name map, rows unpermuted, q/k norms)."""
    hf = tiny_model("qwen3")
    path = tmp_path / "qwen3.gguf"
    write_gguf(hf, path)
    source = resolve_model(str(path))
    config = load_model_config(source)
    assert config.architecture == "Qwen3ForCausalLM" and config.qk_norm and config.head_dim == 32
    ours = build_model(config, TorchAttentionBackend(), torch.float32, torch.device("cpu"))
    ours.load_weights(iter_weights(source, config))
    check_scenario(hf, ours, "chunked_prefill", ATOL)


def write_gguf(model: Any, path: Path) -> None:
    import gguf
    import numpy as np

    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, c.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch="qwen3")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(tensor.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
