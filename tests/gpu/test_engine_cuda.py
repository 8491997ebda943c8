"""The whole engine on CUDA: logits vs HF on the GPU, CUDA-graph vs eager greedy tokens, prefix caching on/off."""

from __future__ import annotations

import random

import pytest
import torch

from lmserve.attention.backend import get_attention_backend
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.models.config import ModelConfig
from lmserve.models.registry import build_model
from tests.models.model_helpers import hf_config_dict, tiny_hf_model

CUDA = torch.device("cuda")
GREEDY = GenerationConfig(max_new_tokens=24, ignore_eos=True, do_sample=False)


def make_engine(
    hf_model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, **config: object
) -> LLMEngine:
    model_config = ModelConfig.from_hf_config(hf_config_dict(hf_model))
    net = build_model(model_config, get_attention_backend(CUDA), dtype, CUDA)
    net.load_weights(hf_model.state_dict().items())
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    options = {"cache_max_entry_count": 4096, "max_batch_size": 8, **config}
    engine_config = EngineConfig(dtype=name, device="cuda", **options)  # type: ignore[arg-type]
    return LLMEngine.build(engine_config, model_config, net)


def run_all(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids]


def prompts(vocab: int, num: int = 6, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(5, 90))] for _ in range(num)]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def hf_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    shape = dict(vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return tiny_hf_model(request.param, **shape)


def test_logits_match_hf_on_gpu(hf_model: torch.nn.Module) -> None:
    """One prefill through the engine's runner (Triton attention, fused kernels) vs HF float32 on the GPU."""
    engine = make_engine(hf_model, eager_mode=True)
    prompt = prompts(hf_model.config.vocab_size, 1)[0]
    engine.add_request(prompt, GenerationConfig(max_new_tokens=1))
    schedule = engine.scheduler.schedule()
    batch = engine.runner.step_batch(schedule.scheduled)
    with torch.inference_mode():
        ours = engine.runner.model.compute_logits(engine.runner.forward(batch))
        reference = hf_model.to(CUDA)(torch.tensor([prompt], device=CUDA)).logits[0].float()
    hf_model.cpu()
    # bf16 weights and activations vs float32: 3% of the largest logit (stated tolerance)
    assert (ours - reference).abs().max() <= 0.03 * reference.abs().max()


def test_cuda_graph_and_eager_give_the_same_tokens(hf_model: torch.nn.Module) -> None:
    batch = prompts(hf_model.config.vocab_size)
    eager = run_all(make_engine(hf_model, dtype=torch.float16, eager_mode=True), batch)
    graphed_engine = make_engine(hf_model, dtype=torch.float16)
    assert graphed_engine.runner.graph_runner is not None
    assert run_all(graphed_engine, batch) == eager


def test_prefix_caching_on_and_off_give_the_same_tokens(hf_model: torch.nn.Module) -> None:
    vocab = hf_model.config.vocab_size
    shared = (prompts(vocab, 1, seed=5)[0] * 3)[:120]
    batch = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
    plain = run_all(make_engine(hf_model, dtype=torch.float16, cache_block_seq_len=16), batch)
    cached_engine = make_engine(
        hf_model, dtype=torch.float16, cache_block_seq_len=16, enable_prefix_caching=True
    )
    first = run_all(cached_engine, batch[:1])
    rest = run_all(cached_engine, batch[1:])
    assert first + rest == plain
    assert cached_engine.stats().prefix_cache_hits > 0


def test_sampling_on_gpu_is_seeded_and_batch_independent(hf_model: torch.nn.Module) -> None:
    engine = make_engine(hf_model)
    config = GenerationConfig(
        max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, top_k=40, random_seed=7
    )
    prompt = prompts(hf_model.config.vocab_size, 1, seed=9)[0]

    def sample(extra: int) -> list[int]:
        first = engine.add_request(prompt, config)
        for p in prompts(hf_model.config.vocab_size, extra, seed=extra):
            engine.add_request(p, GREEDY)
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == first:
                    tokens.extend(out.token_ids)
        return tokens

    assert sample(0) == sample(3)


def test_overlap_schedule_gives_the_synchronous_tokens(hf_model: torch.nn.Module) -> None:
    """Graph replays fed on the device by the previous step's tokens: stops, logprobs, preemption, aborts."""
    from tests.engine.test_overlap_tiny import run

    vocab = hf_model.config.vocab_size
    batch = prompts(vocab, num=8, seed=3)
    configs = [GREEDY.with_updates(logprobs=2 if i % 2 else None, max_new_tokens=8 + 3 * i) for i in range(8)]
    configs[1] = configs[1].with_updates(stop_token_ids=(7, 11, 13))
    configs[2] = configs[2].with_updates(repetition_penalty=1.3)  # read back before each next step
    # a small KV cache (12 blocks of 16) makes the batch preempt
    config = {"cache_block_seq_len": 16, "cache_max_entry_count": 12 * 16}
    sync = make_engine(hf_model, torch.float16, overlap_schedule=False, **config)
    overlapped = make_engine(hf_model, torch.float16, overlap_schedule=True, **config)
    assert overlapped.overlap and overlapped.runner.graph_runner is not None
    expected = run(sync, batch, configs, {5: 4})
    got = run(overlapped, batch, configs, {5: 4})
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
    for ours, theirs in zip(got, expected, strict=True):  # the same logprobs, up to the kernels' rounding
        assert [lp.token_id for lp in ours.logprobs] == [lp.token_id for lp in theirs.logprobs]
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-3
    assert overlapped.num_preemptions > 0
