"""Our models' logits against HF transformers on tiny random models: full prefill, chunked prefill, mixed batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmserve.attention.backend import get_attention_backend
from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.models.config import ModelConfig
from lmserve.models.internlm2 import InternLM2ForCausalLM
from lmserve.models.registry import build_model
from tests.models.model_helpers import PagedSequences, hf_config_dict, hf_logits, tiny_hf_model

ATOL = 1e-4  # float32 end to end; differences are summation order only
KINDS = ["llama", "llama_linear", "mistral", "qwen2"]
BLOCK_SIZE = 4
CPU = torch.device("cpu")


def build_ours(hf_model: Any) -> Any:
    config = ModelConfig.from_hf_config(hf_config_dict(hf_model))
    model = build_model(config, TorchAttentionBackend(), torch.float32, CPU)
    model.load_weights(hf_model.state_dict().items())
    return model


def new_cache(model: Any, num_blocks: int = 64) -> tuple[list[torch.Tensor], PagedSequences]:
    c = model.config
    caches = TorchAttentionBackend().allocate_kv_cache(
        c.num_hidden_layers, num_blocks, BLOCK_SIZE, c.num_key_value_heads, c.head_dim, torch.float32, CPU
    )
    return caches, PagedSequences(num_blocks, BLOCK_SIZE)


@torch.no_grad()
def run_step(
    model: Any, caches: list[torch.Tensor], paged: PagedSequences, chunks: list[tuple[str, list[int]]]
):
    batch = paged.step(chunks)
    plan = model.attention_backend.prepare(batch.metadata)
    return model.compute_logits(model(batch.input_ids, batch.positions, caches, plan))


def prompt(seed: int, length: int, vocab: int = 97) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_full_prefill_matches_hf(kind: str) -> None:
    hf = tiny_hf_model(kind)
    model = build_ours(hf)
    caches, paged = new_cache(model)
    tokens = prompt(1, 23)
    ours = run_step(model, caches, paged, [("a", tokens)])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_matches_hf(kind: str) -> None:
    hf = tiny_hf_model(kind)
    model = build_ours(hf)
    caches, paged = new_cache(model)
    tokens = prompt(2, 30)
    chunks = [tokens[:7], tokens[7:9], tokens[9:]]  # chunk edges cross block edges (block size 4)
    ours = torch.cat([run_step(model, caches, paged, [("a", chunk)]) for chunk in chunks])
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_of_decodes_and_prefill_chunk_matches_hf(kind: str) -> None:
    hf = tiny_hf_model(kind)
    model = build_ours(hf)
    caches, paged = new_cache(model)
    seq_a, seq_b, seq_c = prompt(3, 13), prompt(4, 6), prompt(5, 19)
    run_step(model, caches, paged, [("a", seq_a[:12]), ("b", seq_b[:5])])
    run_step(model, caches, paged, [("c", seq_c[:8])])
    # one step: two decodes of different lengths, then the rest of c's prompt
    logits = run_step(model, caches, paged, [("a", seq_a[12:]), ("b", seq_b[5:]), ("c", seq_c[8:])])
    torch.testing.assert_close(logits[0], hf_logits(hf, seq_a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_logits(hf, seq_b)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2:], hf_logits(hf, seq_c)[8:], atol=ATOL, rtol=0)


def test_decode_steps_match_hf() -> None:
    hf = tiny_hf_model("llama")
    model = build_ours(hf)
    caches, paged = new_cache(model)
    seqs = {"a": prompt(6, 9), "b": prompt(7, 5)}
    run_step(model, caches, paged, [("a", seqs["a"][:5]), ("b", seqs["b"][:1])])
    for step in range(4):  # decode-only batches whose lengths differ and cross block edges
        logits = run_step(
            model, caches, paged, [(s, [t[5 + step if s == "a" else 1 + step]]) for s, t in seqs.items()]
        )
        torch.testing.assert_close(logits[0], hf_logits(hf, seqs["a"][: 6 + step])[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[1], hf_logits(hf, seqs["b"][: 2 + step])[-1], atol=ATOL, rtol=0)


def internlm2_state_dict(hf_llama: Any) -> dict[str, torch.Tensor]:
    """HF Llama weights renamed into an InternLM2 checkpoint, q/k/v packed per KV group into wqkv."""
    c = hf_llama.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_llama.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:
            continue
        if ".q_proj." in name:
            prefix, _, param = name.partition(".self_attn.q_proj.")
            parts = [hf_llama.state_dict()[f"{prefix}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            per_group = [p.unflatten(0, (c.num_key_value_heads, -1)) for p in parts]  # [Hkv, rows, ...]
            out[f"{prefix}.attention.wqkv.{param}"] = torch.cat(per_group, dim=1).flatten(0, 1)
            continue
        out[internlm2_name(name)] = tensor
    return out


def internlm2_name(name: str) -> str:
    pairs = [
        ("model.embed_tokens.", "model.tok_embeddings."),
        ("self_attn.o_proj.", "attention.wo."),
        ("mlp.gate_proj.", "feed_forward.w1."),
        ("mlp.up_proj.", "feed_forward.w3."),
        ("mlp.down_proj.", "feed_forward.w2."),
        ("input_layernorm.", "attention_norm."),
        ("post_attention_layernorm.", "ffn_norm."),
        ("lm_head.", "output."),
    ]
    for old, new in pairs:
        name = name.replace(old, new)
    return name


def internlm2_config(hf_llama: Any) -> dict[str, Any]:
    c = hf_llama.config
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"],
        "rope_scaling": {"type": "dynamic", "factor": 2.0},  # equals plain rope within the original context
        "bias": True,
        "tie_word_embeddings": False,
        "eos_token_id": [2, 92542],
    }


def test_internlm2_matches_hf_llama_with_same_weights() -> None:
    hf = tiny_hf_model("llama_linear", rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    config = ModelConfig.from_hf_config(internlm2_config(hf))
    assert config.attention_bias and config.o_proj_bias and config.eos_token_ids == (2, 92542)
    model = build_model(config, TorchAttentionBackend(), torch.float32, CPU)
    assert isinstance(model, InternLM2ForCausalLM)
    model.load_weights(internlm2_state_dict(hf).items())
    caches, paged = new_cache(model)
    tokens = prompt(8, 21)
    chunks = [tokens[:10], tokens[10:]]
    ours = torch.cat([run_step(model, caches, paged, [("a", chunk)]) for chunk in chunks])
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=ATOL, rtol=0)


def test_load_weights_names_unexpected_and_missing() -> None:
    hf = tiny_hf_model("qwen2")
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match="model.layers.0.mlp.bogus.weight"):
        build_ours_from(hf, {**state, "model.layers.0.mlp.bogus.weight": torch.zeros(1)})
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        build_ours_from(hf, state)
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="qkv_proj"):
        build_ours_from(hf, state)


def build_ours_from(hf: Any, state: dict[str, torch.Tensor]) -> None:
    config = ModelConfig.from_hf_config(hf_config_dict(hf))
    build_model(config, TorchAttentionBackend(), torch.float32, CPU).load_weights(state.items())


def test_from_hf_config_fields() -> None:
    llama = ModelConfig.from_hf_config(hf_config_dict(tiny_hf_model("llama")))
    assert (llama.head_dim, llama.num_key_value_heads, llama.tie_word_embeddings) == (16, 2, True)
    assert llama.rope_type == "llama3" and llama.rope_scaling and llama.rope_scaling["factor"] == 8.0
    qwen2 = ModelConfig.from_hf_config(hf_config_dict(tiny_hf_model("qwen2")))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.sliding_window is None
    old_style = {**hf_config_dict(tiny_hf_model("mistral")), "rope_theta": 1e6, "eos_token_id": 2}
    old_style.pop("rope_parameters")
    mistral = ModelConfig.from_hf_config(old_style)
    assert (mistral.rope_theta, mistral.eos_token_ids, mistral.rope_scaling) == (1e6, (2,), None)


def test_from_hf_config_rejects_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        ModelConfig.from_hf_config({"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 8})


def test_get_attention_backend_on_cpu_is_torch() -> None:
    assert isinstance(get_attention_backend(CPU), TorchAttentionBackend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_tracks_float32_hf(dtype: torch.dtype) -> None:
    hf = tiny_hf_model("llama")
    config = ModelConfig.from_hf_config(hf_config_dict(hf))
    model = build_model(config, TorchAttentionBackend(), dtype, CPU)
    model.load_weights(hf.state_dict().items())
    assert model.model.embed_tokens.weight.dtype == dtype
    c = model.config
    caches = TorchAttentionBackend().allocate_kv_cache(
        2, 16, BLOCK_SIZE, c.num_key_value_heads, c.head_dim, dtype, CPU
    )
    paged = PagedSequences(16, BLOCK_SIZE)
    tokens = prompt(9, 11)
    ours = torch.cat([run_step(model, caches, paged, [("a", chunk)]) for chunk in (tokens[:6], tokens[6:])])
    expected = hf_logits(hf, tokens)
    # half precision: relative to the logits' spread (bf16 keeps 8 mantissa bits)
    torch.testing.assert_close(ours, expected, atol=0.03 * float(expected.abs().max()), rtol=0)


def test_awq_checkpoint_loads_into_fused_projections() -> None:
    """AWQ tensors pack output features along dim 1: q/k/v and gate/up shards must be fused there."""
    from lmserve.layers.quant_formats import awq_dequantize, awq_quantization_config
    from lmserve.quant.rtn import awq_tensors, quantize_groups

    hf, group_size = tiny_hf_model("qwen2"), 32
    awq: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                tensors = awq_tensors(quantize_groups(module.weight, 4, group_size, symmetric=False))
                awq |= {f"{name}.{key}": value for key, value in tensors.items()}
                # the reference runs the very weights the checkpoint encodes, one projection at a time
                dequantized = awq_dequantize(
                    tensors["qweight"], tensors["qzeros"], tensors["scales"].float(), group_size
                )
                module.weight.copy_(dequantized.t())
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("_proj.weight")} | awq
    config_dict = {**hf_config_dict(hf), "quantization_config": awq_quantization_config(4, group_size)}
    model = build_model(ModelConfig.from_hf_config(config_dict), TorchAttentionBackend(), torch.float32, CPU)
    model.load_weights(state.items())
    caches, paged = new_cache(model)
    tokens = prompt(10, 17)
    ours = torch.cat([run_step(model, caches, paged, [("a", chunk)]) for chunk in (tokens[:9], tokens[9:])])
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=ATOL, rtol=0)
