"""FP8 W8A8 on CUDA: the Triton per-token quantizer against the torch one, torch._scaled_mm against the float32
reference, and an FP8 engine's greedy text against bf16."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.fp8 import (
    GEMV_MAX_ROWS,
    fp8_gemv,
    fp8_gemv_ref,
    fp8_linear,
    fp8_linear_ref,
    per_token_quant_fp8,
    quantize_rows_fp8,
)
from lmserve.kernels.testing import relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_rows,k", [(1, 4096), (7, 14336), (256, 4096), (3, 100)])
def test_per_token_quant_fp8_matches_torch(num_rows: int, k: int, dtype: torch.dtype) -> None:
    x = (torch.randn(num_rows, k, device="cuda") * torch.rand(num_rows, 1, device="cuda") * 10).to(dtype)
    q, scale = per_token_quant_fp8(x)
    q_ref, scale_ref = quantize_rows_fp8(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("num_rows", [1, 16, 33, 300])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (576, 960)])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_matches_the_float32_reference(num_rows: int, k: int, n: int, bias: bool) -> None:
    weight, weight_scale = quantize_rows_fp8(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(num_rows, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    out = fp8_linear(x, weight, weight_scale, b)
    # up to GEMV_MAX_ROWS rows the activations stay bf16 (fp8_gemv), above they are rounded to e4m3 per token
    reference = fp8_gemv_ref if num_rows <= GEMV_MAX_ROWS else fp8_linear_ref
    ref = reference(x, weight, weight_scale, b)
    assert out.dtype == torch.bfloat16 and out.shape == (num_rows, n)
    # the same products; what is left is bf16 output rounding and summation order
    assert relative_error(out, ref) < 4e-3


def poison_cache_allocator() -> None:
    """Fill freed allocator blocks with NaN, so a kernel that skips writing part of its output fails."""
    torch.full((64, 2**20), float("nan"), device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 2, 5, 16])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (4096, 28672), (576, 960), (100, 72)])
@pytest.mark.parametrize("use_dot", [0, 1])
def test_fp8_gemv_matches_the_float32_reference(
    num_rows: int, k: int, n: int, use_dot: int, dtype: torch.dtype
) -> None:
    weight, weight_scale = quantize_rows_fp8(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(num_rows, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if k == 576 else None
    poison_cache_allocator()
    out = fp8_gemv(x, weight, weight_scale, b, use_dot=use_dot)
    ref = fp8_gemv_ref(x, weight, weight_scale, b)
    assert out.dtype == dtype and out.shape == (num_rows, n)
    for row in range(num_rows):  # e4m3 widens exactly: only float32 summation order and one output rounding
        assert relative_error(out[row], ref[row]) < (4e-3 if dtype == torch.bfloat16 else 1e-3), f"{row=}"


@pytest.mark.parametrize("k_per_split", [256, 1024])
def test_fp8_gemv_split_counters_survive_graph_replays(k_per_split: int) -> None:
    weight, weight_scale = quantize_rows_fp8(torch.randn(6144, 4096, device="cuda") * 0.02)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ref = fp8_gemv_ref(x, weight, weight_scale, None)
    fp8_gemv(x, weight, weight_scale, None, k_per_split=k_per_split)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemv(x, weight, weight_scale, None, k_per_split=k_per_split)
    for _ in range(3):
        out.zero_()
        graph.replay()
        assert relative_error(out, ref) < 4e-3


def test_fp8_engine_tracks_bf16() -> None:
    from lmserve.attention.backend import get_attention_backend
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import LLMEngine
    from lmserve.generation import GenerationConfig
    from lmserve.layers.quant import prepare_for_inference
    from lmserve.models.config import ModelConfig
    from lmserve.models.loader import with_load_time_quantization
    from lmserve.models.registry import build_model
    from tests.engine.test_engine_tiny import random_prompts
    from tests.models.model_helpers import hf_config_dict, tiny_hf_model

    hf_model = tiny_hf_model("llama", tie_word_embeddings=False, hidden_size=256, intermediate_size=512)
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True, do_sample=False, logprobs=0)
    prompts = random_prompts(4, hf_model.config.vocab_size, seed=1)
    cuda = torch.device("cuda")

    def first_logprobs(model_format: str) -> list[float]:
        model_config = with_load_time_quantization(
            model_format, ModelConfig.from_hf_config(hf_config_dict(hf_model))
        )
        net = build_model(model_config, get_attention_backend(cuda, 0), torch.bfloat16, cuda)
        net.load_weights(hf_model.state_dict().items())
        prepare_for_inference(net)
        engine_config = EngineConfig(
            dtype="bfloat16", device="cuda", cache_max_entry_count=4096, max_batch_size=8
        )
        engine = LLMEngine.build(engine_config, model_config, net)
        ids = [engine.add_request(p, config) for p in prompts]
        first: dict[str, float] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.logprobs and out.request_id not in first:
                    first[out.request_id] = out.logprobs[0].logprob
        return [first[i] for i in ids]

    bf16, fp8 = first_logprobs("auto"), first_logprobs("fp8")
    assert bf16 != fp8  # it did quantize
    assert max(abs(a - b) for a, b in zip(bf16, fp8, strict=True)) < 0.1
