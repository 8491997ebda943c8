"""The residual add and RMSNorm inside the one-row GEMV (LMSERVE_DECODE_FUSION=norm): the kernel against
fused_add_rms_norm followed by the GEMV, and an engine whose qkv and gate_up projections take it, against the same
engine without it."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import gemv
from lmserve.kernels.fp8 import add_norm_gemv, fp8_gemv, quantize_rows_fp8
from lmserve.kernels.gemv import one_row_gemv_options
from lmserve.kernels.rmsnorm import fused_add_rms_norm
from lmserve.kernels.testing import relative_error
from tests.gpu.test_greedy_gpu import gemv_engine, gemv_model  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 28672), (4096, 4608), (2048, 5000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8_weight", [False, True])
@pytest.mark.parametrize("tile", ["layer", "fused"])
def test_add_norm_gemv_is_the_norm_then_the_gemv(
    k: int, n: int, dtype: torch.dtype, fp8_weight: bool, tile: str
) -> None:
    """tile: the layers' GEMV options, or the fused norm's 16-channel programs (gemv._ADD_NORM_TILE)."""
    generator = torch.Generator(device="cuda").manual_seed(k + n)
    x, residual = (torch.randn(1, k, device="cuda", generator=generator).to(dtype) for _ in range(2))
    norm_weight = (torch.rand(k, device="cuda", generator=generator) + 0.5).to(dtype)
    dense = torch.randn(n, k, device="cuda", generator=generator) * 0.02
    weight, scale = quantize_rows_fp8(dense) if fp8_weight else (dense.to(dtype), None)
    options = (one_row_gemv_options(k, n) or {}) | (gemv._ADD_NORM_TILE if tile == "fused" else {})
    before = residual.clone()
    out, new_residual = add_norm_gemv(x, residual, norm_weight, 1e-5, weight, scale, None, **options)
    normed, summed = fused_add_rms_norm(x, residual.clone(), norm_weight, 1e-5)
    assert torch.equal(residual, before) and torch.equal(new_residual, summed)
    unfused = fp8_gemv(normed, weight, scale, None, kernel="triton", **options)
    # the norm's sum of squares in another order: its rsqrt may differ by an ulp, a normed input by one rounding
    assert relative_error(out, unfused) < 2e-3


def test_add_norm_gemv_in_a_cuda_graph_with_pdl() -> None:
    """Two fused launches in a chain captured once and replayed over new inputs: each reads the residual the one
    before wrote (programmatic dependents under PDL on sm_90)."""
    k, n = 4096, 4096
    weight = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    norm_weight = torch.rand(k, device="cuda").bfloat16() + 0.5
    x, residual = torch.randn(1, k, device="cuda").bfloat16(), torch.randn(1, k, device="cuda").bfloat16()
    options = one_row_gemv_options(k, n)
    assert options is not None

    def chain() -> tuple[torch.Tensor, torch.Tensor]:
        out, mid = add_norm_gemv(x, residual, norm_weight, 1e-5, weight, None, None, **options)
        return add_norm_gemv(out, mid, norm_weight, 1e-5, weight, None, None, **options)

    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, last = chain()
    for _ in range(3):
        x.normal_()
        residual.normal_()
        graph.replay()
        torch.cuda.synchronize()
        normed, mid = fused_add_rms_norm(x, residual.clone(), norm_weight, 1e-5)
        first = fp8_gemv(normed, weight, None, None, kernel="triton", **options)
        normed, summed = fused_add_rms_norm(first, mid, norm_weight, 1e-5)
        assert relative_error(last, summed) < 2e-3
        assert relative_error(out, fp8_gemv(normed, weight, None, None, kernel="triton", **options)) < 4e-3


def test_engine_with_the_norm_fused_keeps_its_tokens(
    gemv_model: torch.nn.Module,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batch-1 decode (CUDA graphs) with qkv and gate_up taking the add and norm: the tokens of the same engine
    without it, or parted at a near tie; and the fused launch really ran (only with the fusion on)."""
    from tests.gpu.test_kv_quant_gpu import assert_divergences_are_near_ties, run_with_logprobs

    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 32768, (n,), generator=rng).tolist() for n in (1, 9, 40)]
    runs = []
    for fuse in (False, True):
        monkeypatch.setattr(gemv, "FUSE_NORM", fuse)
        calls = {"fused": 0}
        original = gemv.add_norm_gemv

        def counting(*args, original=original, calls=calls, **kwargs):  # type: ignore[no-untyped-def]
            calls["fused"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(gemv, "add_norm_gemv", counting)
        engine = gemv_engine(gemv_model, True)
        per_prompt = [run_with_logprobs(engine, [p]) for p in prompts]
        runs.append(([t[0] for t, _ in per_prompt], [lp[0] for _, lp in per_prompt]))
        # every layer but the first takes it before qkv, every layer before gate_up: at capture and in eager steps
        assert (calls["fused"] > 0) == fuse
        del engine
    (plain, plain_logprobs), (fused, fused_logprobs) = runs
    assert_divergences_are_near_ties(fused, plain, fused_logprobs, plain_logprobs)
