"""The batch-1 greedy step on CUDA: greedy_argmax against torch.argmax (ties included), the Triton GEMV over
16-bit weights (float32 logits) against the float32 reference, and an engine whose one-row linears run it
against HF and against cuBLAS's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from lmserve.attention.backend import get_attention_backend
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.kernels.argmax import greedy_argmax
from lmserve.kernels.gemv import one_row_gemv_options, one_row_linear
from lmserve.kernels.testing import TOLERANCE, relative_error
from lmserve.layers.linear import Linear

CUDA = torch.device("cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 3, 64])
@pytest.mark.parametrize("vocab_size", [97, 4096, 4097, 49152, 128256])
def test_greedy_argmax_matches_torch_with_ties(num_rows: int, vocab_size: int, dtype: torch.dtype) -> None:
    logits = torch.randn(num_rows, vocab_size, device="cuda").to(dtype)
    # each row's maximum again at a later index, in another chunk where the row has one: the first must win
    top, first = logits.max(-1)
    later = torch.randint(0, vocab_size, (num_rows,), device="cuda").maximum(first)
    logits[torch.arange(num_rows), later] = top
    logits[0, :] = logits[0, 0]  # a constant row: index 0
    expected = logits.argmax(-1)
    assert expected[0] == 0
    assert torch.equal(greedy_argmax(logits), expected)
    # twice: the per-row arrival counters reset themselves
    assert torch.equal(greedy_argmax(logits), expected)


def test_greedy_argmax_of_masked_rows_and_in_a_cuda_graph() -> None:
    logits = torch.randn(4, 49152, device="cuda")
    logits[1, :40000] = float("-inf")  # a grammar mask leaves a few tokens
    logits[2, :] = float("-inf")
    logits[2, 7] = -1e30
    expected = logits.argmax(-1)
    greedy_argmax(logits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = greedy_argmax(logits)
    for _ in range(3):
        graph.replay()
        assert torch.equal(out, expected)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize(
    "k,n",
    [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256), (576, 49152), (4608, 4099)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_of_16bit_weights_with_the_dispatched_options(
    k: int, n: int, dtype: torch.dtype, bias: bool
) -> None:
    """The options one_row_gemv_options gives each shape (Llama-3-8B's, and uneven ones): float32 logits, and the
    16-bit output a Linear returns."""
    options = one_row_gemv_options(k, n)
    assert options is not None
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    weight = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    ref = x.float() @ weight.float().t() + (0 if b is None else b.float())
    out = one_row_linear(x, weight, b, options, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (1, n)
    # float32 sums of exact products, in another order than torch's: no output rounding to 16 bits
    assert relative_error(out, ref) < 1e-5
    assert relative_error(one_row_linear(x, weight, b, options), ref) < TOLERANCE[dtype] / 4  # one rounding


# every linear on the GEMV at batch 1: qkv 4096 -> 4608, o 4096 -> 4096, gate_up 4096 -> 16384, down 8192 ->
# 4096, and the lm_head 4096 -> 32768 (kernels/gemv.py's vocabulary programs)
GEMV_SHAPE = dict(
    vocab_size=32768, hidden_size=4096, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
    num_key_value_heads=2, head_dim=128,
)  # fmt: skip


@pytest.fixture(scope="module")
def gemv_model() -> torch.nn.Module:
    from tests.models.model_helpers import tiny_hf_model

    return tiny_hf_model("llama", tie_word_embeddings=False, **GEMV_SHAPE)


def gemv_engine(hf_model: torch.nn.Module, use_gemv: bool, **config: object) -> LLMEngine:
    """A bf16 engine; use_gemv False sends every one-row linear and the lm_head to cuBLAS (before capture)."""
    from lmserve.config import EngineConfig
    from lmserve.models.config import ModelConfig
    from lmserve.models.registry import build_model
    from tests.models.model_helpers import hf_config_dict

    model_config = ModelConfig.from_hf_config(hf_config_dict(hf_model))
    net = build_model(model_config, get_attention_backend(CUDA), torch.bfloat16, CUDA)
    net.load_weights(hf_model.state_dict().items())
    linears = [m for m in net.modules() if isinstance(m, Linear)]
    assert sum(m.gemv_options is not None for m in linears) == 4 * GEMV_SHAPE["num_hidden_layers"] + 1
    if not use_gemv:
        for m in linears:
            m.gemv_options = None
    options = {"cache_max_entry_count": 4096, "max_batch_size": 8, **config}
    engine_config = EngineConfig(dtype="bfloat16", device="cuda", **options)  # type: ignore[arg-type]
    return LLMEngine.build(engine_config, model_config, net)


def test_one_row_logits_match_hf(gemv_model: torch.nn.Module) -> None:
    """A one-token prompt runs every linear on one row (the GEMV) and the float32 lm_head; against HF float32."""
    engine = gemv_engine(gemv_model, True, eager_mode=True)
    prompt = [17]
    engine.add_request(prompt, GenerationConfig(max_new_tokens=1))
    batch = engine.runner.step_batch(engine.scheduler.schedule().scheduled)
    with torch.inference_mode():
        hidden = engine.runner.forward(batch)
        ours = engine.runner.model.compute_logits(hidden)
        cublas = torch.nn.functional.linear(hidden, engine.runner.model.lm_head.weight).float()
        reference = gemv_model.to(CUDA)(torch.tensor([prompt], device=CUDA)).logits[0].float()
    gemv_model.cpu()
    assert ours.dtype == torch.float32
    # bf16 weights and activations against float32, as test_engine_cuda's tolerance; the float32 logits are no
    # further from HF than cuBLAS's bf16 ones (which round each logit once more)
    assert (ours - reference).abs().max() <= 0.03 * reference.abs().max()
    assert relative_error(ours, reference) <= relative_error(cublas, reference) * 1.01
    assert relative_error(ours, cublas) < 4e-3  # the same products; bf16 rounding of cuBLAS's output


def test_one_row_gemv_keeps_greedy_tokens(gemv_model: torch.nn.Module) -> None:
    """Batch-1 decode (CUDA graphs) with the GEMV and with cuBLAS: the same greedy tokens, or parted at a tie."""
    from tests.gpu.test_kv_quant_gpu import assert_divergences_are_near_ties, run_with_logprobs

    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, GEMV_SHAPE["vocab_size"], (n,), generator=rng).tolist() for n in (1, 9, 40)]
    runs = []
    for use_gemv in (True, False):
        engine = gemv_engine(gemv_model, use_gemv)
        assert engine.runner.graph_runner is not None
        per_prompt = [run_with_logprobs(engine, [p]) for p in prompts]  # one at a time: batch 1
        runs.append(([t[0] for t, _ in per_prompt], [lp[0] for _, lp in per_prompt]))
        del engine
    (tokens, logprobs), (cublas_tokens, cublas_logprobs) = runs
    # every parting must be at a near tie of the two runs' logprobs; how many of the three random-weight prompts
    # part is the hardware's luck (cuBLAS rounds differently on the H100 and the H200: 1 of 3 identical on the
    # H100, 3 of 3 on the H200), so it is not counted (as in test_kv_quant_fp8_gpu's engine test)
    assert_divergences_are_near_ties(tokens, cublas_tokens, logprobs, cublas_logprobs)
