"""The fused MoE kernel on CUDA against its dense torch reference over shapes, under CUDA graphs, and a tiny
Mixtral / Qwen3-MoE through the CUDA engine (graphs on) against the same model run eagerly."""

from __future__ import annotations

import random

import pytest
import torch

from lmserve.attention.backend import get_attention_backend
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.kernels.fused_moe import (
    fused_moe,
    fused_moe_ref,
    moe_align_block_size_ref,
    moe_align_block_size_triton,
)
from lmserve.kernels.testing import TOLERANCE, relative_error
from lmserve.layers.moe import TopKRouter, expert_loop
from lmserve.models.config import ModelConfig
from lmserve.models.registry import build_model
from tests.models.model_helpers import hf_config_dict
from tests.models.test_moe_models import tiny_moe_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
# (experts, top-k, hidden, expert intermediate): Mixtral-like, Qwen3-30B-A3B-like (H, I as in the model), odd
SHAPES = [(8, 2, 1024, 1792), (128, 8, 2048, 768), (16, 4, 320, 200)]
NUM_TOKENS = [1, 2, 3, 16, 33, 128, 255, 512]


def random_moe(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int, dtype: torch.dtype
):
    x = torch.randn(num_tokens, hidden, device=CUDA).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * intermediate, hidden, device=CUDA) / hidden**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, intermediate, device=CUDA) / intermediate**0.5).to(dtype)
    with torch.device(CUDA):
        router = TopKRouter(hidden, num_experts, top_k, renormalize=top_k == 2)
    router.weight.normal_()
    weights, ids = router(x)
    return x, gate_up, down, weights, ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}k{}H{}I{}".format(*s))
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_fused_moe_matches_dense_reference(
    num_tokens: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x, gate_up, down, weights, ids = random_moe(num_tokens, *shape, dtype)
    out = fused_moe(x, gate_up, down, weights, ids)
    ref = fused_moe_ref(x, gate_up, down, weights, ids)
    assert out.dtype == dtype and out.shape == ref.shape
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k", [(1, 8, 2), (300, 8, 2), (1, 128, 8), (4096, 128, 8)]
)
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_kernel_equals_torch(num_tokens: int, num_experts: int, top_k: int, block_m: int) -> None:
    ids = torch.rand(num_tokens, num_experts, device=CUDA).topk(top_k, dim=-1).indices
    ours = moe_align_block_size_triton(ids, num_experts, block_m)
    ref = moe_align_block_size_ref(ids, num_experts, block_m)
    assert torch.equal(ours.num_rows_padded, ref.num_rows_padded)
    assert torch.equal(ours.sorted_row_ids, ref.sorted_row_ids)
    assert torch.equal(ours.expert_ids, ref.expert_ids)


def test_expert_loop_on_cuda_matches_fused() -> None:
    x, gate_up, down, weights, ids = random_moe(77, 8, 2, 512, 384, torch.bfloat16)
    loop = expert_loop(x, gate_up, down, weights, ids)
    assert relative_error(fused_moe(x, gate_up, down, weights, ids), loop) < TOLERANCE[torch.bfloat16]


def test_fused_moe_replays_under_cuda_graphs_with_new_routing() -> None:
    x, gate_up, down, weights, ids = random_moe(8, 128, 8, 256, 128, torch.bfloat16)
    fused_moe(x, gate_up, down, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, gate_up, down, weights, ids)
    for _ in range(3):
        new_x, _, _, new_weights, new_ids = random_moe(8, 128, 8, 256, 128, torch.bfloat16)
        x.copy_(new_x), weights.copy_(new_weights), ids.copy_(new_ids)
        graph.replay()
        ref = fused_moe_ref(new_x, gate_up, down, new_weights, new_ids)
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    greedy = GenerationConfig(max_new_tokens=16, ignore_eos=True, do_sample=False)
    ids = [engine.add_request(p, greedy) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids]


def make_engine(hf: torch.nn.Module, dtype: str, eager: bool) -> LLMEngine:
    model_config = ModelConfig.from_hf_config(hf_config_dict(hf))
    net = build_model(model_config, get_attention_backend(CUDA), getattr(torch, dtype), CUDA)
    net.load_weights(hf.state_dict().items())
    config = EngineConfig(  # a few thousand KV tokens, not 80 % of the GPU: two engines live at once
        dtype=dtype, device="cuda", max_batch_size=8, eager_mode=eager, cache_max_entry_count=4096
    )  # type: ignore[arg-type]
    return LLMEngine.build(config, model_config, net)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_prefill_logits_match_hf_on_gpu(kind: str) -> None:
    hf = tiny_moe_model(kind)
    engine = make_engine(hf, "bfloat16", eager=True)
    prompt = random.Random(1).choices(range(97), k=40)
    engine.add_request(prompt, GenerationConfig(max_new_tokens=1))
    batch = engine.runner.step_batch(engine.scheduler.schedule().scheduled)
    with torch.inference_mode():
        ours = engine.runner.model.compute_logits(engine.runner.forward(batch))
        reference = hf(torch.tensor([prompt])).logits[0, -1].float().to(CUDA)
    # bf16 weights and activations vs float32: 3% of the largest logit (stated tolerance, as for dense models)
    assert (ours[-1] - reference).abs().max() <= 0.03 * reference.abs().max()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_engine_cuda_graphs_give_the_eager_tokens(kind: str) -> None:
    hf = tiny_moe_model(kind)
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(rng.randint(3, 40))] for _ in range(5)]
    graphed = make_engine(hf, "float16", eager=False)
    assert graphed.runner.graph_runner is not None
    assert greedy_tokens(graphed, prompts) == greedy_tokens(make_engine(hf, "float16", eager=True), prompts)
