"""FP8 W8A8 on CUDA: the Triton per-token quantizer against the torch one, torch._scaled_mm against the float32
reference, the norms and SiLU-and-mul that quantize their output for an FP8 linear against quantize_rows_fp8 of
the unfused output, and an FP8 engine's greedy text against bf16 and against itself without those fusions."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lmserve.kernels.activation import silu_and_mul, silu_and_mul_fp8
from lmserve.kernels.fp8 import (
    CUDA_MAX_K_PER_CTA,
    CUDA_VARIANTS,
    GEMV_MAX_ROWS,
    Fp8Activation,
    cuda_gemv_available,
    fp8_gemv,
    fp8_gemv_ref,
    fp8_linear,
    fp8_linear_ref,
    per_token_quant_fp8,
    quantize_rows_fp8,
)
from lmserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from lmserve.kernels.testing import relative_error
from lmserve.layers.fp8 import Fp8Linear

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


def random_rows(num_rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of different magnitudes (so their scales differ), one of them all zeros (the minimum scale)."""
    x = torch.randn(num_rows, width, device="cuda") * (torch.rand(num_rows, 1, device="cuda") * 8 + 0.01)
    x[num_rows // 2] = 0
    return x.to(dtype)


def assert_quantizes(fused: Fp8Activation, unfused: torch.Tensor) -> None:
    """fused holds exactly quantize_rows_fp8 of the 16-bit rows the unfused kernel writes."""
    q_ref, scale_ref = quantize_rows_fp8(unfused)
    assert (
        fused.dtype == unfused.dtype and fused.q.dtype == torch.float8_e4m3fn and fused.shape == unfused.shape
    )
    assert torch.equal(fused.scale, scale_ref)
    assert torch.equal(fused.q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows,hidden", [(17, 4096), (300, 4096), (8192, 4096), (33, 2000)])
@pytest.mark.parametrize("add_residual", [False, True])
def test_rms_norm_fp8_is_quantize_rows_of_the_unfused_norm(
    num_rows: int, hidden: int, add_residual: bool, dtype: torch.dtype
) -> None:
    x, weight = random_rows(num_rows, hidden, dtype), torch.rand(hidden, device="cuda").to(dtype) + 0.5
    if not add_residual:
        poison_cache_allocator()
        assert_quantizes(rms_norm(x, weight, 1e-5, fp8=True), rms_norm(x, weight, 1e-5))  # type: ignore[arg-type]
        return
    residual = random_rows(num_rows, hidden, dtype)
    fused_residual = residual.clone()
    unfused, residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    poison_cache_allocator()
    fused, fused_residual = fused_add_rms_norm(x, fused_residual, weight, 1e-5, fp8=True)
    assert torch.equal(fused_residual, residual)
    assert_quantizes(fused, unfused)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "num_rows,intermediate", [(17, 14336), (256, 14336), (4096, 14336), (40, 7168), (20, 1000)]
)
@pytest.mark.parametrize("num_warps", [None, 8])  # the default (32 warps at 14336) and narrower programs
def test_silu_and_mul_fp8_is_quantize_rows_of_the_unfused_activation(
    num_rows: int, intermediate: int, dtype: torch.dtype, num_warps: int | None
) -> None:
    gate_up = random_rows(num_rows, 2 * intermediate, dtype)
    poison_cache_allocator()
    assert_quantizes(silu_and_mul_fp8(gate_up, num_warps), silu_and_mul(gate_up))


@pytest.mark.parametrize("num_rows", [17, 256, 2048])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_on_fused_rows_equals_the_unfused_path(num_rows: int, bias: bool) -> None:
    linear = Fp8Linear(7168, 4096, bias, "dynamic", None).cuda()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4096, 7168, device="cuda") * 0.02)
        if bias:
            linear.bias.copy_(torch.randn(4096, device="cuda"))
    linear.prepare_for_inference()
    gate_up = random_rows(num_rows, 2 * 7168, torch.bfloat16)
    assert linear.takes_fp8_activation(num_rows) and not linear.takes_fp8_activation(GEMV_MAX_ROWS)
    fused, unfused = linear(silu_and_mul_fp8(gate_up)), linear(silu_and_mul(gate_up))
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, unfused)  # the same rows into the same GEMM


def build_fp8_engine(
    hf_model: torch.nn.Module, model_format: str, max_batch_size: int, eager_mode: bool = False
) -> Any:
    from lmserve.attention.backend import get_attention_backend
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import LLMEngine
    from lmserve.layers.quant import prepare_for_inference
    from lmserve.models.config import ModelConfig
    from lmserve.models.loader import with_load_time_quantization
    from lmserve.models.registry import build_model
    from tests.models.model_helpers import hf_config_dict

    cuda = torch.device("cuda")
    model_config = with_load_time_quantization(
        model_format, ModelConfig.from_hf_config(hf_config_dict(hf_model))
    )
    net = build_model(model_config, get_attention_backend(cuda, 0), torch.bfloat16, cuda)
    net.load_weights(hf_model.state_dict().items())  # type: ignore[operator]
    prepare_for_inference(net)
    engine_config = EngineConfig(
        dtype="bfloat16",
        device="cuda",
        cache_max_entry_count=4096,
        max_batch_size=max_batch_size,
        eager_mode=eager_mode,
    )
    return LLMEngine.build(engine_config, model_config, net)


def greedy_with_logprobs(
    engine: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[list[tuple[int, float]]]:
    from lmserve.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True, do_sample=False, logprobs=0)
    ids = [engine.add_request(p, config) for p in prompts]
    tokens: dict[str, list[tuple[int, float]]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += [(lp.token_id, lp.logprob) for lp in out.logprobs or []]
    return [tokens[i] for i in ids]


def tiny_llama() -> torch.nn.Module:
    from tests.models.model_helpers import tiny_hf_model

    return tiny_hf_model("llama", tie_word_embeddings=False, hidden_size=256, intermediate_size=512)


def test_fp8_engine_tracks_bf16() -> None:
    from tests.engine.test_engine_tiny import random_prompts

    hf_model = tiny_llama()
    prompts = random_prompts(4, hf_model.config.vocab_size, seed=1)

    def first_logprobs(model_format: str) -> list[float]:
        runs = greedy_with_logprobs(build_fp8_engine(hf_model, model_format, 8), prompts, 8)
        return [tokens[0][1] for tokens in runs]

    bf16, fp8 = first_logprobs("auto"), first_logprobs("fp8")
    assert bf16 != fp8  # it did quantize
    assert max(abs(a - b) for a, b in zip(bf16, fp8, strict=True)) < 0.1


@pytest.mark.parametrize("eager_mode", [False, True])
def test_fp8_engine_with_fused_quantization_equals_it_without(
    monkeypatch: pytest.MonkeyPatch, eager_mode: bool
) -> None:
    """24 requests: prefill chunks and decode steps of 24 rows (CUDA graphs unless eager) take the norms' and
    SiLU's e4m3 rows; without the fusion the separate quantizer makes the same rows, so tokens and logprobs agree
    bit for bit."""
    from lmserve.kernels import activation
    from tests.engine.test_engine_tiny import random_prompts

    hf_model = tiny_llama()
    prompts = random_prompts(24, hf_model.config.vocab_size, seed=2, low=20, high=60)
    calls = []
    fused_silu = activation.silu_and_mul_fp8
    monkeypatch.setattr(activation, "silu_and_mul_fp8", lambda x: calls.append(x.shape[0]) or fused_silu(x))

    def run() -> list[list[tuple[int, float]]]:
        return greedy_with_logprobs(build_fp8_engine(hf_model, "fp8", 32, eager_mode), prompts, 12)

    fused = run()
    # decodes of 24 rows (padded to a captured size with graphs) and the prefill ran fused
    assert any(GEMV_MAX_ROWS < n <= 32 for n in calls) and any(n > 32 for n in calls)
    monkeypatch.setattr(Fp8Linear, "takes_fp8_activation", lambda self, num_rows: False)
    calls.clear()
    unfused = run()
    assert not calls
    assert fused == unfused


cuda_fp8_gemv = pytest.mark.skipif(
    not torch.cuda.is_available() or not cuda_gemv_available(torch.device("cuda")),
    reason="the CUDA C FP8 GEMV needs NVRTC and an sm_89+ GPU",
)


@cuda_fp8_gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "k,n", [(4096, 6144), (14336, 4096), (4096, 28672), (576, 960), (272, 72), (32768, 40)]
)
@pytest.mark.parametrize("warps,unroll", sorted(CUDA_VARIANTS))
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_cuda_fp8_gemv_matches_the_float32_reference(
    k: int, n: int, warps: int, unroll: int, splits: int | None, dtype: torch.dtype
) -> None:
    weight, weight_scale = quantize_rows_fp8(torch.randn(n, k, device="cuda") * 0.02)
    # rows of very different magnitudes: float16 staging of x (times 2^-8) must neither overflow nor lose them
    x = (torch.randn(1, k, device="cuda") * torch.logspace(-3, 3, k, device="cuda")).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if k in (576, 272) else None
    options = {"warps": warps, "unroll": unroll} | ({} if splits is None else {"splits": splits})
    if splits is not None and math.ceil(k / splits) > CUDA_MAX_K_PER_CTA:
        pytest.skip("more inputs a CTA than its shared memory holds")
    poison_cache_allocator()
    out = fp8_gemv(x, weight, weight_scale, b, kernel="cuda", **options)
    ref = fp8_gemv_ref(x, weight, weight_scale, b)
    assert out.dtype == dtype and out.shape == (1, n)
    # e4m3 widens exactly: only float32 summation order and one output rounding
    assert relative_error(out, ref) < (4e-3 if dtype == torch.bfloat16 else 1e-3)


@cuda_fp8_gemv
@pytest.mark.parametrize("pdl", [0, 1])
def test_cuda_fp8_gemv_is_the_one_row_default_and_survives_graph_replays(pdl: int) -> None:
    weight, weight_scale = quantize_rows_fp8(torch.randn(4096, 14336, device="cuda") * 0.02)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    ref = fp8_gemv_ref(x, weight, weight_scale, None)
    forced = fp8_gemv(x, weight, weight_scale, None, kernel="cuda", splits=4)
    assert torch.equal(
        fp8_linear(x, weight, weight_scale, None), fp8_gemv(x, weight, weight_scale, None, kernel="cuda")
    )
    square = weight[:, :4096].contiguous()
    expected = fp8_gemv(forced, square, weight_scale, None, kernel="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # with pdl, each launch a programmatic dependent of the one before
        out = fp8_gemv(x, weight, weight_scale, None, kernel="cuda", splits=4, pdl=pdl)
        again = fp8_gemv(x, weight, weight_scale, None, kernel="cuda", splits=4, pdl=pdl)
        twice = fp8_gemv(out, square, weight_scale, None, kernel="cuda", pdl=pdl)
    for _ in range(3):  # the split counters are reset by each tile's last CTA
        out.zero_()
        graph.replay()
        assert torch.equal(out, forced) and torch.equal(again, forced)
        # the third launch reads the first's output: with PDL only after griddepcontrol.wait
        assert torch.equal(twice, expected)
    assert relative_error(out, ref) < 4e-3


@cuda_fp8_gemv
def test_cuda_fp8_gemv_refuses_what_it_cannot_take() -> None:
    weight, weight_scale = quantize_rows_fp8(torch.randn(64, 100, device="cuda") * 0.02)
    x = torch.randn(1, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not take"):  # K not a multiple of 16
        fp8_gemv(x, weight, weight_scale, None, kernel="cuda")
    assert (
        relative_error(fp8_gemv(x, weight, weight_scale, None), fp8_gemv_ref(x, weight, weight_scale, None))
        < 4e-3
    )
    weight, weight_scale = quantize_rows_fp8(torch.randn(64, 256, device="cuda") * 0.02)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="warps, unroll"):
        fp8_gemv(x, weight, weight_scale, None, kernel="cuda", warps=2)


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_fp8_logits_are_the_e4m3_products(tmp_path: Any, tied: bool) -> None:
    """--lm-head-fp8 on CUDA: up to GEMV_MAX_ROWS rows the FP8 GEMV (the CUDA kernel at one row) multiplies the
    unquantized bf16 rows, above them cuBLASLt's FP8 GEMM the per-token e4m3 rows; float32 logits either way, and an
    engine's first greedy logprobs stay near the bf16 head's (same random weights)."""
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import LLMEngine
    from tests.engine.test_engine_tiny import random_prompts
    from tests.models.model_helpers import tiny_hf_model

    hf = tiny_hf_model(
        "llama", tie_word_embeddings=tied, hidden_size=256, intermediate_size=512, vocab_size=320
    )
    hf.config.to_json_file(tmp_path / "config.json")

    def engine(lm_head_fp8: bool) -> Any:
        config = EngineConfig(
            device="cuda",
            dtype="bfloat16",
            max_batch_size=8,
            cache_max_entry_count=4096,
            lm_head_fp8=lm_head_fp8,
        )
        return LLMEngine.from_random_weights(str(tmp_path / "config.json"), config)

    fp8_engine, bf16_engine = engine(True), engine(False)
    model = fp8_engine.runner.model
    assert model.lm_head is None and model.lm_head_fp8 is not None
    q, scale = model.lm_head_fp8
    q_ref, scale_ref = quantize_rows_fp8(bf16_engine.runner.model.lm_head_weight())
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
    for num_rows in (1, 5, GEMV_MAX_ROWS, 40):
        hidden = torch.randn(num_rows, 256, device="cuda", dtype=torch.bfloat16)
        logits = model.compute_logits(hidden)
        reference = fp8_gemv_ref if num_rows <= GEMV_MAX_ROWS else fp8_linear_ref
        assert logits.dtype == torch.float32 and logits.shape == (num_rows, 320)
        assert relative_error(logits, reference(hidden, q, scale, None)) < 4e-3

    prompts = random_prompts(4, 320, seed=3)
    bf16 = [t[0][1] for t in greedy_with_logprobs(bf16_engine, prompts, 6)]
    fp8 = [t[0][1] for t in greedy_with_logprobs(fp8_engine, prompts, 6)]
    assert bf16 != fp8 and max(abs(a - b) for a, b in zip(bf16, fp8, strict=True)) < 0.1
