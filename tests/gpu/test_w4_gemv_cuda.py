"""The CUDA C one-row W4A16 GEMV (lmserve/kernels/cuda/w4_gemv.cu, compiled by NVRTC) against the AutoAWQ float32
reference: group sizes 16..256, both activation dtypes with either scale dtype, Llama-3-8B and odd shapes, every
split setting, and its split counters under CUDA-graph replays."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmserve.kernels import cuda_jit
from lmserve.kernels.awq_dequant import awq_gemm_ref
from lmserve.kernels.testing import relative_error
from lmserve.kernels.w4a16 import CUDA_GEMV_SOURCE, cuda_gemv_available, repack_awq, w4a16_matmul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOLERANCE = {torch.bfloat16: 4e-3, torch.float16: 1e-3}
KERNELS = [{"prefetch": 0}, {"prefetch": 1}, {"occupancy": 3}]
"""The register-staged kernel, its prefetching form and the register-staged kernel held to 3 CTAs per SM (_o3)."""
KERNEL_IDS = ["regs", "prefetch", "o3"]


def skip_if_no_o3(kernel: dict[str, int], group_size: int) -> None:
    if kernel.get("occupancy") == 3 and group_size < 64:
        pytest.skip("the _o3 kernels take group sizes >= 64")


def random_awq(k: int, n: int, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    words = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device="cuda")
    zeros = torch.randint(-(2**31), 2**31 - 1, (k // group_size, n // 8), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // group_size, n, device="cuda") * 0.01 + 0.002).to(scale_dtype)
    return words, zeros, scales


def test_the_cuda_gemv_compiles_here() -> None:
    """NVRTC is part of PyTorch's CUDA wheels: on a CUDA machine the kernel must compile (else the Triton GEMV
    runs silently slower)."""
    assert cuda_jit.available(CUDA_GEMV_SOURCE, torch.cuda.current_device())
    assert cuda_gemv_available(torch.device("cuda"))


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize(
    "k,n", [(4096, 6144), (14336, 4096), (256, 72), (512, 1000), (576, 1536), (1536, 576)]
)
def test_cuda_gemv_matches_reference(
    k: int, n: int, group_size: int, scale_dtype, x_dtype, kernel: dict[str, int]
) -> None:
    if k % group_size:
        pytest.skip("group must divide K")
    skip_if_no_o3(kernel, group_size)
    qweight, qzeros, scales = random_awq(k, n, group_size, scale_dtype)
    weight = repack_awq(qweight, qzeros, scales, group_size)
    x = torch.randn(1, k, device="cuda").to(x_dtype)
    torch.full((64, 2**20), float("nan"), device="cuda")  # freed blocks poisoned: unwritten outputs fail
    out = w4a16_matmul(x, weight, kernel="cuda", **kernel)
    ref = awq_gemm_ref(x, qweight, qzeros, scales, group_size)
    assert out.shape == ref.shape and out.dtype == x_dtype
    assert relative_error(out, ref) < TOLERANCE[x_dtype]


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("blocks_per_cta", [1, 3, 8, 9, 16, 32, 64])
def test_cuda_gemv_every_split(blocks_per_cta: int, kernel: dict[str, int]) -> None:
    k, n, group_size = 14336, 4096, 128
    qweight, qzeros, scales = random_awq(k, n, group_size, torch.float16)
    weight = repack_awq(qweight, qzeros, scales, group_size)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = w4a16_matmul(x, weight, kernel="cuda", blocks_per_cta=blocks_per_cta, **kernel)
    assert (
        relative_error(out, awq_gemm_ref(x, qweight, qzeros, scales, group_size)) < TOLERANCE[torch.bfloat16]
    )


@pytest.mark.parametrize("blocks_per_cta", [3, 16, 64])
@pytest.mark.parametrize("group_size", [64, 128, 256])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_o3_kernel_is_the_register_kernel_bit_for_bit(blocks_per_cta: int, group_size: int, x_dtype) -> None:
    """The _o3 kernels are the register-staged kernel's code under a register cap (spills included): the same sums
    in the same order, so the same output bits whatever the split."""
    k, n = 14336, 1536
    weight = repack_awq(*random_awq(k, n, group_size, torch.float16), group_size)
    x = torch.randn(1, k, device="cuda").to(x_dtype)
    options = {"kernel": "cuda", "blocks_per_cta": blocks_per_cta}
    o3 = w4a16_matmul(x, weight, occupancy=3, **options)
    assert torch.equal(o3, w4a16_matmul(x, weight, prefetch=0, **options))


def test_default_o3_choice_falls_back_below_group_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """GEMV_OCCUPANCY = 3 picks the _o3 kernels by default; a group they cannot take (32) runs the default
    choice (GEMV_OCCUPANCY 1), right."""
    from lmserve.kernels import w4a16

    monkeypatch.setattr(w4a16, "GEMV_OCCUPANCY", 3)
    assert w4a16.cuda_gemv_options(4096, 32, torch.device("cuda"))["occupancy"] == 3
    for group_size in (32, 128):
        qweight, qzeros, scales = random_awq(4096, 1024, group_size, torch.float16)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        out = w4a16_matmul(x, repack_awq(qweight, qzeros, scales, group_size), kernel="cuda")
        ref = awq_gemm_ref(x, qweight, qzeros, scales, group_size)
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]


def test_cuda_gemv_rejects_a_split_it_cannot_hold() -> None:
    qweight, qzeros, scales = random_awq(1024, 256, 128, torch.float16)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="blocks_per_cta"):
        w4a16_matmul(x, repack_awq(qweight, qzeros, scales, 128), kernel="cuda", blocks_per_cta=65)
    with pytest.raises(ValueError, match="prefetch"):
        w4a16_matmul(x, repack_awq(qweight, qzeros, scales, 128), kernel="cuda", prefetch=2)
    with pytest.raises(ValueError, match="occupancy"):
        w4a16_matmul(x, repack_awq(qweight, qzeros, scales, 128), kernel="cuda", occupancy=2)
    with pytest.raises(ValueError, match="group sizes >= 64"):
        w4a16_matmul(x, repack_awq(qweight, qzeros, scales, 128), kernel="cuda", occupancy=3, prefetch=1)
    qweight, qzeros, scales = random_awq(1024, 256, 32, torch.float16)
    with pytest.raises(ValueError, match="group sizes >= 64"):
        w4a16_matmul(x, repack_awq(qweight, qzeros, scales, 32), kernel="cuda", occupancy=3)


@pytest.mark.parametrize("kernel", [{"prefetch": 0}, {"occupancy": 3}], ids=["regs", "o3"])
@pytest.mark.parametrize("blocks_per_cta", [8, 32])
def test_cuda_gemv_split_counters_survive_graph_replays(blocks_per_cta: int, kernel: dict[str, int]) -> None:
    k, n, group_size = 4096, 6144, 128
    qweight, qzeros, scales = random_awq(k, n, group_size, torch.float16)
    weight = repack_awq(qweight, qzeros, scales, group_size)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = awq_gemm_ref(x, qweight, qzeros, scales, group_size)
    w4a16_matmul(x, weight, kernel="cuda", blocks_per_cta=blocks_per_cta, **kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_matmul(x, weight, kernel="cuda", blocks_per_cta=blocks_per_cta, **kernel)
    for _ in range(3):
        out.zero_()
        graph.replay()
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("pdl", [0, 1])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_cuda_gemv_as_a_programmatic_dependent_reads_its_predecessor(
    pdl: int, kernel: dict[str, int]
) -> None:
    """With pdl each launch starts while the one before still runs and waits (griddepcontrol.wait) before it reads
    x: a second GEMV whose x is the first one's output must see it whole, split counters included, in replays."""
    k = n = 4096
    first, second = (random_awq(k, n, 128, torch.float16) for _ in range(2))
    w1, w2 = (repack_awq(*weights, 128) for weights in (first, second))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    options = {"kernel": "cuda", "blocks_per_cta": 8, "pdl": pdl, **kernel}
    w4a16_matmul(w4a16_matmul(x, w1, **options), w2, **options)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_matmul(x, w1, **options)
        twice = w4a16_matmul(out, w2, **options)
    for _ in range(3):
        out.zero_()
        twice.zero_()
        graph.replay()
        assert relative_error(out, awq_gemm_ref(x, *first, 128)) < TOLERANCE[torch.bfloat16]
        assert relative_error(twice, awq_gemm_ref(out, *second, 128)) < TOLERANCE[torch.bfloat16]
    with pytest.raises(ValueError, match="pdl"):
        w4a16_matmul(x, w1, kernel="cuda", pdl=2)


@pytest.mark.parametrize("pdl", [0, 1])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("k,n", [(14336, 4096), (1536, 576), (512, 1000)])
def test_silu_gemv_is_the_gemv_of_silu_and_mul(
    k: int, n: int, group_size: int, x_dtype, kernel: dict[str, int], pdl: int
) -> None:
    """The _silu kernels make silu(gate) * up while staging x with the instructions of the Triton silu_and_mul, so
    a down projection fed the gate_up row equals, bit for bit, the GEMV of the separate activation's output; and
    both track the float32 reference of silu(gate) * up times the weight."""
    from lmserve.kernels.activation import silu_and_mul, silu_and_mul_ref
    from lmserve.kernels.w4a16 import w4a16_silu_gemv

    qweight, qzeros, scales = random_awq(k, n, group_size, torch.float16)
    weight = repack_awq(qweight, qzeros, scales, group_size)
    skip_if_no_o3(kernel, group_size)
    gate_up = (torch.randn(1, 2 * k, device="cuda") * 3).to(x_dtype)
    options = {"pdl": pdl, **kernel}
    torch.full((64, 2**20), float("nan"), device="cuda")  # freed blocks poisoned: unwritten outputs fail
    fused = w4a16_silu_gemv(gate_up, weight, **options)
    activation = silu_and_mul(gate_up)
    unfused = w4a16_matmul(activation, weight, kernel="cuda", **options)
    assert fused.shape == (1, n) and fused.dtype == x_dtype
    assert torch.equal(fused, unfused)
    ref = awq_gemm_ref(silu_and_mul_ref(gate_up.float()).to(x_dtype), qweight, qzeros, scales, group_size)
    assert relative_error(fused, ref) < TOLERANCE[x_dtype]
    with pytest.raises(ValueError, match="features"):
        w4a16_silu_gemv(gate_up[:, :k], weight)


def awq_engine_runs(tmp_path) -> Any:
    """run(): greedy tokens and logprobs of three prompts, one sequence at a time (one-row decode steps, CUDA
    graphs), from a fresh AWQ engine of random weights whose down projection is above tinygemm's one-row size."""
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import LLMEngine
    from tests.engine.test_engine_tiny import random_prompts
    from tests.gpu.test_fp8_gpu import greedy_with_logprobs
    from tests.models.model_helpers import tiny_hf_model

    hf = tiny_hf_model(
        "llama", hidden_size=2048, intermediate_size=8448, num_attention_heads=16, num_key_value_heads=8
    )
    hf.config.to_json_file(tmp_path / "config.json")
    prompts = random_prompts(3, hf.config.vocab_size, seed=4)

    def run() -> list[list[tuple[int, float]]]:
        config = EngineConfig(device="cuda", model_format="awq", max_batch_size=4, cache_max_entry_count=4096)
        engine = LLMEngine.from_random_weights(str(tmp_path / "config.json"), config)
        return [greedy_with_logprobs(engine, [prompt], 8)[0] for prompt in prompts]

    return run


@pytest.mark.skipif(not cuda_gemv_available(torch.device("cuda")), reason="the CUDA C W4A16 GEMV needs NVRTC")
def test_engine_down_projection_with_the_activation_fused_gives_the_same_tokens(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AWQ down projection that makes silu(gate) * up itself gives the tokens and logprobs of the separate
    activation bit for bit (the CUDA GEMV takes the down projection: above tinygemm's one-row size)."""
    from lmserve.layers.quant import AWQLinear

    run = awq_engine_runs(tmp_path)
    calls: list[bool] = []
    fused_forward = AWQLinear.silu_gated_forward

    def counted(self, gate_up: torch.Tensor):
        out = fused_forward(self, gate_up)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(AWQLinear, "silu_gated_forward", counted)
    fused = run()
    assert any(calls)  # the graphs captured the fused down projection
    monkeypatch.setattr(AWQLinear, "silu_gated_forward", lambda self, gate_up: None)
    assert run() == fused


@pytest.mark.skipif(not cuda_gemv_available(torch.device("cuda")), reason="the CUDA C W4A16 GEMV needs NVRTC")
@pytest.mark.parametrize("pdl", [0, 1])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks_per_cta", [None, 3])
@pytest.mark.parametrize("k,n,group_size", [(4096, 6144, 128), (4096, 28672, 128), (1568, 576, 32)])
def test_norm_gemv_is_the_gemv_of_the_norm(
    k: int, n: int, group_size: int, blocks_per_cta: int | None, x_dtype, kernel: dict[str, int], pdl: int
) -> None:
    """The _norm kernels make RMSNorm(x + residual) * w while staging x, every CTA over the whole row (splits
    included): the new residual equals fused_add_rms_norm's bit for bit, and the output the GEMV of the norm's
    output (the sum of squares in another order: an rsqrt an ulp apart may round a normed input differently)."""
    from lmserve.kernels.rmsnorm import fused_add_rms_norm
    from lmserve.kernels.w4a16 import w4a16_add_norm_gemv

    qweight, qzeros, scales = random_awq(k, n, group_size, torch.float16)
    weight = repack_awq(qweight, qzeros, scales, group_size)
    x, residual = (
        (torch.randn(1, k, device="cuda") * 2).to(x_dtype),
        torch.randn(1, k, device="cuda").to(x_dtype),
    )
    norm_weight = (torch.rand(k, device="cuda") + 0.5).to(x_dtype)
    skip_if_no_o3(kernel, group_size)
    options = {"pdl": pdl, **kernel} | ({"blocks_per_cta": blocks_per_cta} if blocks_per_cta else {})
    before = residual.clone()
    torch.full((64, 2**20), float("nan"), device="cuda")  # freed blocks poisoned: unwritten outputs fail
    out, new_residual = w4a16_add_norm_gemv(x, residual, norm_weight, 1e-5, weight, **options)
    normed, summed = fused_add_rms_norm(x, residual.clone(), norm_weight, 1e-5)
    assert torch.equal(residual, before) and torch.equal(new_residual, summed)
    unfused = w4a16_matmul(normed, weight, kernel="cuda", **options)
    assert out.shape == (1, n) and out.dtype == x_dtype
    assert relative_error(out, unfused) < TOLERANCE[x_dtype] / 2


@pytest.mark.skipif(not cuda_gemv_available(torch.device("cuda")), reason="the CUDA C W4A16 GEMV needs NVRTC")
def test_engine_with_the_norm_in_the_w4_gemv_keeps_its_tokens(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWQ's qkv and gate_up taking the residual add and RMSNorm (LMSERVE_DECODE_FUSION=norm) give the tokens of
    the separate norm, or part at a near tie."""
    from lmserve.kernels import gemv, w4a16

    run = awq_engine_runs(tmp_path)
    calls: list[int] = []
    original = w4a16.w4a16_add_norm_gemv

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    import lmserve.layers.quant as quant

    monkeypatch.setattr(quant, "w4a16_add_norm_gemv", counted)
    plain = run()
    assert not calls
    monkeypatch.setattr(gemv, "FUSE_NORM", True)
    fused = run()
    assert calls  # the graphs captured the fused projections
    assert_same_or_near_ties(fused, plain)


def assert_same_or_near_ties(
    runs: list[list[tuple[int, float]]], baseline: list[list[tuple[int, float]]]
) -> None:
    """Each sequence's (token, logprob) pairs equal the baseline's tokens with logprobs within a sum's rounding, or
    part from them where the two picks were close in both runs."""
    for seq, base in zip(runs, baseline, strict=True):
        tokens, base_tokens = [t for t, _ in seq], [t for t, _ in base]
        parted = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens, strict=True)) if a != b), None)
        if parted is None:
            assert max(abs(a - b) for (_, a), (_, b) in zip(seq, base, strict=True)) < 0.05
        else:
            assert abs(seq[parted][1] - base[parted][1]) < 0.05, (parted, seq, base)


@pytest.mark.skipif(not cuda_gemv_available(torch.device("cuda")), reason="the CUDA C W4A16 GEMV needs NVRTC")
def test_engine_on_the_o3_kernels_gives_the_same_tokens(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An AWQ engine whose one-row GEMVs run on the _o3 kernels (GEMV_OCCUPANCY = 3) gives the default's tokens and
    logprobs exactly: the same sums, other splits aside (the down projection's split count differs)."""
    from lmserve.kernels import cuda_jit, w4a16

    run = awq_engine_runs(tmp_path)
    plain = run()
    launched: list[str] = []
    function = cuda_jit.function

    def named(file_name: str, kernel: str, device_index: int):  # type: ignore[no-untyped-def]
        launched.append(kernel)
        return function(file_name, kernel, device_index)

    monkeypatch.setattr(w4a16, "GEMV_OCCUPANCY", 3)
    monkeypatch.setattr(cuda_jit, "function", named)
    o3 = run()
    assert any("_o3" in name for name in launched)
    assert_same_or_near_ties(o3, plain)
