"""The CPU's one-call decode step (models/cpu_decode.py, kernels/cpu/decode_step.c) against the same model run
op by op: the same tokens and the same logprobs, bit for bit, for 1-16 sequences of ragged lengths, GQA and a
sliding window; and the cases it leaves to the per-op path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import lmserve.models.llama as llama_module
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.kernels import cpu_native
from lmserve.layers.linear import Linear
from lmserve.models import cpu_decode

pytestmark = pytest.mark.skipif(not cpu_native.kernel_available(), reason="no AVX512-BF16 CPU or C compiler")

TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 320,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def q4_1_weight(num_out: int, num_in: int, generator: torch.Generator) -> torch.Tensor:
    """llama.cpp's Q4_1 structure: per 32 inputs d * q + m, q spanning 0..15, d and m float16."""
    groups = num_in // 32
    codes = torch.randint(0, 16, (num_out, groups, 32), generator=generator)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(num_out, groups, 1, generator=generator) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(num_out, groups, 1, generator=generator) * 0.15).half().float()
    return (codes * d + m).reshape(num_out, num_in)


def q4_engine(tmp_path: Path, **config_overrides: Any) -> LLMEngine:
    """A random tiny Llama whose linears hold Q4_1-exact weights (as a GGUF Q4_1 checkpoint gives them)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, **config_overrides}))
    config = EngineConfig(device="cpu", dtype="bfloat16", session_len=256, max_batch_size=20, seed=0)
    engine = LLMEngine.from_random_weights(str(path), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in engine.runner.model.modules():
            if isinstance(module, Linear):
                weight = q4_1_weight(module.out_features, module.in_features, generator)
                module.weight.copy_(weight)
                module.onednn = None  # the prefill's GEMM reads the dense weight
                assert module.keep_int4_if_exact(weight) and module.q4 is not None
    return engine


def run(engine: LLMEngine, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    """Every request's tokens and logprobs, all submitted at once (decode steps of len(prompts) rows)."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, logprobs=1, ignore_eos=True)
    ids = [engine.add_request(prompt, gen) for prompt in prompts]
    results: dict[str, tuple[list[int], list[float]]] = {request_id: ([], []) for request_id in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens, logprobs = results[out.request_id]
            tokens.extend(out.token_ids)
            logprobs.extend(lp.logprob for lp in out.logprobs or [])
    assert all(len(tokens) == max_new_tokens for tokens, _ in results.values())
    return results


def counting_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows of every one-call step that ran."""
    calls: list[int] = []
    original = cpu_native.decode_step

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        calls.append(out.shape[0])
        return out

    monkeypatch.setattr(cpu_native, "decode_step", counted)
    return calls


def compare(engine: LLMEngine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = counting_steps(monkeypatch)
    fused = run(engine, prompts, 12)
    rows = list(calls)
    with monkeypatch.context() as m:
        m.setattr(llama_module, "decode_step_for", lambda *args: None)
        per_op = run(engine, prompts, 12)
    assert list(fused.values()) == list(per_op.values())
    return rows


@pytest.mark.parametrize("num_seqs", [1, 2, 4, 5, 9, 16])
def test_one_call_step_equals_the_per_op_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_seqs: int
) -> None:
    engine = q4_engine(tmp_path)
    generator = torch.Generator().manual_seed(num_seqs)
    prompts = [
        torch.randint(0, 512, (5 + 37 * i % 200,), generator=generator).tolist() for i in range(num_seqs)
    ]
    rows = compare(engine, prompts, monkeypatch)
    assert rows and max(rows) == num_seqs  # the decode steps ran in one call, every sequence in it


def test_one_call_step_with_a_sliding_window_and_seventeen_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mistral-style window shorter than the prompts; 17 sequences: their steps exceed the C call's 16 rows
    # and run op by op
    engine = q4_engine(
        tmp_path, sliding_window=24, model_type="mistral", architectures=["MistralForCausalLM"]
    )
    assert engine.runner.model.model.layers[0].self_attn.sliding_window == 24
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (30 + 9 * i,), generator=generator).tolist() for i in range(3)]
    assert compare(engine, prompts, monkeypatch)
    many = [torch.randint(0, 512, (20,), generator=generator).tolist() for _ in range(17)]
    assert compare(engine, many, monkeypatch) == []  # 17 rows at every step: none in one call


def test_models_the_step_does_not_cover_keep_the_per_op_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    biased = q4_engine(tmp_path, attention_bias=True)
    model = biased.runner.model.model
    assert not cpu_decode.CPUDecodeStep.supported(model, biased.runner.kv_caches)
    plain = q4_engine(tmp_path)
    model, caches = plain.runner.model.model, plain.runner.kv_caches
    assert cpu_decode.CPUDecodeStep.supported(model, caches)
    monkeypatch.setenv(cpu_decode.DECODE_STEP_ENV, "0")
    assert not cpu_decode.CPUDecodeStep.supported(model, caches)
    monkeypatch.delenv(cpu_decode.DECODE_STEP_ENV)
    model.layers[1].mlp.down_proj.q4 = None  # a linear that is not 4-bit exact
    assert not cpu_decode.CPUDecodeStep.supported(model, caches)
