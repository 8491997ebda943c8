"""LoRA on CUDA (Triton shrink/expand) against PEFT's merged models and the CPU engine: mixed adapter batches."""

from __future__ import annotations

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.kernels.lora import lora_ref, lora_triton
from tests.models.model_helpers import hf_logits
from tests.test_lora import (
    MIXED_ADAPTERS,
    MIXED_PROMPTS,
    greedy,
    make_engine,
    mixed_batch_logits,
    our_model,
    run_all,
    tiny,  # noqa: F401  (the fixture)
)

CUDA = torch.device("cuda")


def test_mixed_batch_logits_on_cuda_equal_peft_merged_models(tiny) -> None:  # noqa: F811
    base, folders, merged = tiny
    ours = mixed_batch_logits(base, folders, CUDA)
    for logits, name, prompt in zip(ours, MIXED_ADAPTERS, MIXED_PROMPTS, strict=True):
        truth = base if name is None else merged[name]
        torch.testing.assert_close(logits, hf_logits(truth, prompt), atol=1e-3, rtol=1e-3)


def test_cuda_engine_mixing_adapters_equals_the_cpu_engine(tiny) -> None:  # noqa: F811
    base, folders, _ = tiny
    prompts = [[3, 9, 27, 81, 50, 1, 7, 7, 19, 2, 40, 41], [4, 8, 15, 16, 23, 42], [60, 61, 62, 5, 5, 9, 1]]
    requests = [(prompts[i % 3], greedy(name, 16)) for i, name in enumerate(["alpha", "beta", None] * 3)]
    cpu = run_all(make_engine(base, adapters=folders, max_prefill_token_num=16), requests)
    net, model_config = our_model(base, CUDA)
    config = EngineConfig(
        dtype="float32", device="cuda", adapters=folders, cache_max_entry_count=4096, max_batch_size=8
    )
    cuda_engine = LLMEngine.build(config, model_config, net)
    assert cuda_engine.runner.graph_runner is None  # with adapters, steps run eagerly
    assert run_all(cuda_engine, requests) == cpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_at_model_shapes_match_reference(dtype: torch.dtype) -> None:
    num_adapters, rank, in_features, out_features = 4, 3 * 64, 4096, 6144  # a fused qkv at rank 64
    a = torch.randn(num_adapters, rank, in_features, device=CUDA).to(dtype) / in_features**0.5
    bt = torch.randn(num_adapters, rank, out_features, device=CUDA).to(dtype) * 0.05
    x = torch.randn(37, in_features, device=CUDA).to(dtype)
    y = torch.randn(37, out_features, device=CUDA).to(dtype)
    slots = torch.randint(0, num_adapters + 1, (37,), device=CUDA, dtype=torch.int32)
    ours, ref = y.clone(), y.clone()
    lora_triton(ours, x, a, bt, slots)
    lora_ref(ref, x, a, bt, slots)
    torch.testing.assert_close(ours.float(), ref.float(), atol=3e-2, rtol=2e-2)
    assert torch.equal(ours[slots == 0], y[slots == 0])
