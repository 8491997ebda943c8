"""Mixtral and Qwen3-MoE against HF transformers on tiny random float32 models: logits over prefill, chunked
prefill and mixed batches, greedy decoding through the engine, and expert weights from every layout we read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.layers.moe import SparseMoeBlock
from lmserve.layers.quant_formats import awq_dequantize, awq_quantization_config
from lmserve.models.config import ModelConfig
from lmserve.models.loader import iter_weights, load_model_config, resolve_model
from lmserve.models.registry import build_model
from lmserve.quant.rtn import awq_tensors, quantize_groups
from tests.models.model_helpers import TINY, PagedSequences, hf_config_dict, hf_logits

ATOL = 1e-4  # float32 end to end; differences are summation order only
BLOCK_SIZE = 4
CPU = torch.device("cpu")
KINDS = ["mixtral", "qwen3_moe", "qwen3_moe_dense_layers"]


def tiny_moe_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random float32 HF MoE model whose routers are decisive (no near-ties to flip on rounding)."""
    torch.manual_seed(seed)
    model: PreTrainedModel
    base = {**TINY, "tie_word_embeddings": False}
    if kind == "mixtral":
        config = MixtralConfig(
            **{**base, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48}
        )
        model = MixtralForCausalLM(config)
    elif kind == "qwen3_moe":  # many experts, top-3, no renormalization
        config = Qwen3MoeConfig(
            **{
                **base,
                "num_experts": 8,
                "num_experts_per_tok": 3,
                "moe_intermediate_size": 32,
                "head_dim": 16,
            }
        )
        model = Qwen3MoeForCausalLM(config)
    elif kind == "qwen3_moe_dense_layers":  # layer 0 dense (mlp_only_layers), then every 2nd layer sparse
        config = Qwen3MoeConfig(
            **{**base, "num_hidden_layers": 4, "num_experts": 6, "num_experts_per_tok": 2},
            moe_intermediate_size=24,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            mlp_only_layers=[0],
        )
        model = Qwen3MoeForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny MoE kind {kind!r}")
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)
            elif "norm" in name:  # HF starts norms at one, which would hide a norm-loading bug
                param.normal_(1.0, 0.1)
    return model.float().eval()


def build_ours(hf: PreTrainedModel, weights: dict[str, torch.Tensor] | None = None) -> Any:
    config = ModelConfig.from_hf_config(hf_config_dict(hf))
    model = build_model(config, TorchAttentionBackend(), torch.float32, CPU)
    model.load_weights((weights if weights is not None else hf.state_dict()).items())
    return model


@torch.no_grad()
def run_step(
    model: Any, caches: list[torch.Tensor], paged: PagedSequences, chunks: list[tuple[str, list[int]]]
):
    batch = paged.step(chunks)
    plan = model.attention_backend.prepare(batch.metadata)
    return model.compute_logits(model(batch.input_ids, batch.positions, caches, plan))


def new_cache(model: Any, num_blocks: int = 64) -> tuple[list[torch.Tensor], PagedSequences]:
    c = model.config
    caches = TorchAttentionBackend().allocate_kv_cache(
        c.num_hidden_layers, num_blocks, BLOCK_SIZE, c.num_key_value_heads, c.head_dim, torch.float32, CPU
    )
    return caches, PagedSequences(num_blocks, BLOCK_SIZE)


def prompt(seed: int, length: int, vocab: int = 97) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def per_expert_state_dict(hf: PreTrainedModel) -> dict[str, torch.Tensor]:
    """transformers 5's stacked experts split back into the per-expert tensors of the HF checkpoints on disk."""
    mixtral = hf.config.model_type == "mixtral"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.state_dict().items():
        prefix = name.replace(".mlp.", ".block_sparse_moe.") if mixtral else name
        if name.endswith("experts.gate_up_proj"):
            experts = prefix.removesuffix(".gate_up_proj")
            for e, (g, u) in enumerate(zip(*tensor.chunk(2, dim=1), strict=True)):
                out[f"{experts}.{e}.{gate}.weight"], out[f"{experts}.{e}.{up}.weight"] = g, u
        elif name.endswith("experts.down_proj"):
            experts = prefix.removesuffix(".down_proj")
            for e, d in enumerate(tensor):
                out[f"{experts}.{e}.{down}.weight"] = d
        else:
            out[prefix] = tensor
    return out


def per_projection_state_dict(hf: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Experts stacked per projection [E, out, in], the layout GGUF's ffn_{gate,up,down}_exps map to."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            experts = name.removesuffix(".gate_up_proj")
            out[f"{experts}.gate_proj.weight"], out[f"{experts}.up_proj.weight"] = tensor.chunk(2, dim=1)
        elif name.endswith("experts.down_proj"):
            out[f"{name.removesuffix('.down_proj')}.down_proj.weight"] = tensor
        else:
            out[name] = tensor
    return out


@pytest.fixture(scope="module", params=KINDS)
def hf_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return tiny_moe_model(request.param)


def test_layers_are_sparse_where_the_config_says(hf_model: PreTrainedModel) -> None:
    ours = build_ours(hf_model)
    ours_sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers]
    hf_sparse = [hasattr(layer.mlp, "experts") for layer in hf_model.model.layers]
    assert ours_sparse == hf_sparse and any(hf_sparse)


def test_prefill_chunked_prefill_and_mixed_batch_match_hf(hf_model: PreTrainedModel) -> None:
    model = build_ours(hf_model)
    caches, paged = new_cache(model)
    full = prompt(1, 23)
    torch.testing.assert_close(
        run_step(model, caches, paged, [("full", full)]), hf_logits(hf_model, full), atol=ATOL, rtol=0
    )
    seq_a, seq_b, seq_c = prompt(3, 13), prompt(4, 6), prompt(5, 19)
    run_step(model, caches, paged, [("a", seq_a[:7]), ("b", seq_b[:5])])
    run_step(model, caches, paged, [("a", seq_a[7:12])])  # a chunked prefill that crosses block edges
    # one step: two decodes of different lengths, then all of c's prompt
    logits = run_step(model, caches, paged, [("a", seq_a[12:]), ("b", seq_b[5:]), ("c", seq_c)])
    torch.testing.assert_close(logits[0], hf_logits(hf_model, seq_a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_logits(hf_model, seq_b)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2:], hf_logits(hf_model, seq_c), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", [per_expert_state_dict, per_projection_state_dict])
def test_expert_layouts_load_the_same_weights(hf_model: PreTrainedModel, layout: Any) -> None:
    stacked = build_ours(hf_model).state_dict()
    loaded = build_ours(hf_model, layout(hf_model)).state_dict()
    assert stacked.keys() == loaded.keys()
    for name, tensor in stacked.items():
        assert torch.equal(tensor, loaded[name]), name


def test_missing_or_extra_expert_is_named() -> None:
    hf = tiny_moe_model("mixtral")
    weights = per_expert_state_dict(hf)
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        build_ours(hf, missing)
    extra = {**weights, "model.layers.0.block_sparse_moe.experts.4.w1.weight": torch.zeros(48, 64)}
    with pytest.raises(ValueError, match="expert 4 >= num_experts=4"):
        build_ours(hf, extra)


def awq_checkpoint(hf: PreTrainedModel, group_size: int) -> dict[str, torch.Tensor]:
    """Every projection of the decoder layers (experts too) as AutoAWQ tensors, per expert; hf's own weights
    are set to what those tensors decode to, so it stays the truth to compare with."""
    checkpoint, decoded = {}, {}
    for name, tensor in per_expert_state_dict(hf).items():
        if ".layers." not in name or "norm" in name or name.endswith(".gate.weight"):
            checkpoint[name] = tensor  # norms and the router stay dense, as in AutoAWQ's Mixtral checkpoints
            continue
        packed = awq_tensors(quantize_groups(tensor, 4, group_size, symmetric=False))
        checkpoint |= {name.replace(".weight", f".{param}"): t for param, t in packed.items()}
        decoded[name] = awq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], group_size).t()
    for name, tensor in hf.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            experts, _, stacked = name.replace(".mlp.", ".block_sparse_moe.").rpartition(".")
            parts = [("w1", "w3") if stacked == "gate_up_proj" else ("w2",)] * tensor.shape[0]
            tensor.copy_(
                torch.stack(
                    [
                        torch.cat([decoded[f"{experts}.{e}.{p}.weight"] for p in ps])
                        for e, ps in enumerate(parts)
                    ]
                )
            )
        elif name.replace(".mlp.", ".block_sparse_moe.") in decoded:
            tensor.copy_(decoded[name])
    return checkpoint


def test_awq_checkpoint_loads_with_experts_dequantized() -> None:
    hf = tiny_moe_model("mixtral")
    group_size = 16
    checkpoint = awq_checkpoint(hf, group_size)
    config = ModelConfig.from_hf_config(
        {**hf_config_dict(hf), "quantization_config": awq_quantization_config(4, group_size)}
    )
    model = build_model(config, TorchAttentionBackend(), torch.float32, CPU)
    model.load_weights(checkpoint.items())
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "AWQLinear"
    caches, paged = new_cache(model)
    tokens = prompt(9, 17)
    torch.testing.assert_close(
        run_step(model, caches, paged, [("a", tokens)]), hf_logits(hf, tokens), atol=1e-3, rtol=0
    )


GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True, do_sample=False)


@torch.no_grad()
def hf_greedy(hf: PreTrainedModel, prompt_ids: list[int], num_tokens: int) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_engine_greedy_matches_hf_with_chunked_prefill_mixed_batches_and_prefix_cache(kind: str) -> None:
    hf = tiny_moe_model(kind, seed=1)
    config = ModelConfig.from_hf_config(hf_config_dict(hf))
    engine_config = EngineConfig(
        dtype="float32",
        device="cpu",
        cache_block_seq_len=4,
        max_prefill_token_num=16,
        session_len=96,
        enable_prefix_caching=True,
    )
    engine = LLMEngine.build(engine_config, config, build_ours(hf))
    shared = prompt(20, 13)
    first = [prompt(10 + i, length) for i, length in enumerate((5, 30, 12))] + [shared + [1, 2]]
    second = [shared + [3, 4, 5], shared[:9]]  # the second round reuses the cached blocks of `shared`
    for prompts in (first, second):
        assert run_engine(engine, prompts) == [hf_greedy(hf, p, 8) for p in prompts]
    assert engine.stats().prefix_cache_hits >= 12


def run_engine(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids]


def write_moe_gguf(hf: PreTrainedModel, path: Path) -> None:
    """Convert like llama.cpp: Mixtral as arch "llama" (q/k rows permuted), Qwen3-MoE as "qwen3moe"; each
    projection of all experts stacked into one [E, out, in] tensor (ffn_{gate,up,down}_exps)."""
    import gguf

    c = hf.config
    mixtral = c.model_type == "mixtral"
    arch = "llama" if mixtral else "qwen3moe"
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if mixtral else gguf.MODEL_ARCH.QWEN3MOE, c.num_hidden_layers
    )
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim or c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_expert_count(c.num_local_experts if mixtral else c.num_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    if not mixtral:
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_weights_norm(c.norm_topk_prob)
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for hf_name, tensor in per_projection_state_dict(hf).items():
        base, suffix = hf_name.rsplit(".", 1)
        weights = tensor.numpy()
        if mixtral and base.endswith(("q_proj", "k_proj")):
            heads = c.num_attention_heads if base.endswith("q_proj") else c.num_key_value_heads
            weights = _llama_cpp_permute(weights, heads)
        if ".experts." in base:
            layer, projection = base.split(".")[2], base.rsplit(".", 1)[1].removesuffix("_proj")
            writer.add_tensor(f"blk.{layer}.ffn_{projection}_exps.{suffix}", weights)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_gguf_experts_load_and_match_hf(kind: str, tmp_path: Path) -> None:
    hf = tiny_moe_model(kind)
    if kind == "qwen3_moe":
        hf.config.norm_topk_prob = True  # llama.cpp's qwen3moe renormalizes; make HF do the same
        for layer in hf.model.layers:
            layer.mlp.gate.norm_topk_prob = True
    write_moe_gguf(hf, tmp_path / "tiny.gguf")
    source = resolve_model(str(tmp_path / "tiny.gguf"))
    config = load_model_config(source)
    assert config.architecture == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[kind]
    assert config.moe is not None and config.moe.top_k == hf.config.num_experts_per_tok
    model = build_model(config, TorchAttentionBackend(), torch.float32, CPU)
    model.load_weights(iter_weights(source, config))
    caches, paged = new_cache(model)
    tokens = prompt(11, 19)
    torch.testing.assert_close(
        run_step(model, caches, paged, [("a", tokens)]), hf_logits(hf, tokens), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe_dense_layers"])
def test_hf_folder_loads_through_the_loader(kind: str, tmp_path: Path) -> None:
    hf = tiny_moe_model(kind)
    hf.save_pretrained(tmp_path)  # transformers writes the per-expert layout of the hub checkpoints
    source = resolve_model(str(tmp_path))
    config = load_model_config(source)
    model = build_model(config, TorchAttentionBackend(), torch.float32, CPU)
    model.load_weights(iter_weights(source, config))
    caches, paged = new_cache(model)
    tokens = prompt(12, 15)
    logits = run_step(model, caches, paged, [("a", tokens)])
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=ATOL, rtol=0)
