"""Tiny random HF models for the newer architectures (Qwen3, Gemma 3, Mistral with a short window)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.models.model_helpers import TINY

WINDOW = 5
"""Shorter than every test prompt and not a multiple of the block size (4)."""


def tiny_model(kind: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random float32 HF model: mistral_window, qwen3, gemma3 (local and global layers), internlm3_llama."""
    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "mistral_window":
        config = {**TINY, "head_dim": 16, "sliding_window": WINDOW, **overrides}
        model = MistralForCausalLM(MistralConfig(**config))
    elif kind == "qwen3":  # head_dim is not hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(**{**TINY, "head_dim": 32, **overrides}))
    elif kind == "gemma3":
        model = Gemma3ForCausalLM(gemma3_config(**overrides))
    elif kind == "internlm3_llama":  # what transformers runs an InternLM3 checkpoint as
        config = {**TINY, "head_dim": 32, "attention_bias": True, "mlp_bias": True, **overrides}
        model = LlamaForCausalLM(LlamaConfig(**config))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.config.architectures = [type(model).__name__]
    randomize(model)
    return model.float().eval()


def gemma3_config(**overrides: Any) -> Gemma3TextConfig:
    """Layers 0, 1 local (window 5, rope base 10k), 2 global (rope base 1M, linear scaling), 3 local."""
    return Gemma3TextConfig(
        **{
            **TINY,
            "num_hidden_layers": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
            },
            "final_logit_softcapping": 3.0,  # small enough that the tanh bends the random logits
            **overrides,
        }
    )


def randomize(model: PreTrainedModel) -> None:
    """Biases and norm weights start at 0 or 1 in HF; random values keep loading bugs visible."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(0.0, 0.1).add_(0.0 if name.endswith(".bias") else 1.0)


SCENARIOS = ["full_prefill", "chunked_prefill", "mixed_batch", "prefix_cache"]


def check_scenario(hf: PreTrainedModel, ours: Any, scenario: str, atol: float) -> None:
    """Our logits against HF's full-sequence logits in one of SCENARIOS; prompts are longer than WINDOW."""
    from tests.models.model_helpers import hf_logits
    from tests.models.test_model_logits import new_cache, prompt, run_step

    vocab = hf.config.vocab_size
    caches, paged = new_cache(ours)
    a, b, c = prompt(11, 23, vocab), prompt(12, 9, vocab), prompt(13, 19, vocab)
    if scenario == "full_prefill":
        got, want = run_step(ours, caches, paged, [("a", a)]), hf_logits(hf, a)
    elif scenario == "chunked_prefill":  # chunk edges cross block edges (4) and the window (5)
        got = torch.cat([run_step(ours, caches, paged, [("a", x)]) for x in (a[:7], a[7:9], a[9:])])
        want = hf_logits(hf, a)
    elif scenario == "mixed_batch":  # two decodes whose windows start mid-block, then the rest of c's prompt
        run_step(ours, caches, paged, [("a", a[:-1]), ("b", b[:-1])])
        run_step(ours, caches, paged, [("c", c[:8])])
        got = run_step(ours, caches, paged, [("a", a[-1:]), ("b", b[-1:]), ("c", c[8:])])
        want = torch.cat([hf_logits(hf, a)[-1:], hf_logits(hf, b)[-1:], hf_logits(hf, c)[8:]])
    else:  # d shares a's first 4 blocks (16 tokens) as a prefix hit and computes only the rest
        run_step(ours, caches, paged, [("a", a)])
        d = a[:16] + prompt(14, 10, vocab)
        paged.block_tables["d"], paged.seq_lens["d"] = paged.block_tables["a"][:4], 16
        got, want = run_step(ours, caches, paged, [("d", d[16:])]), hf_logits(hf, d)[16:]
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
