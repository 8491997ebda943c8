"""LLMEngine on tiny random models vs HF transformers greedy decoding: chunked prefill, mixed batches, preemption."""

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

GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True, do_sample=False)


def make_engine(hf_model: torch.nn.Module, **config: object) -> LLMEngine:
    model_config = ModelConfig.from_hf_config(hf_config_dict(hf_model))
    cpu = torch.device("cpu")
    net = build_model(model_config, get_attention_backend(cpu), torch.float32, cpu)
    net.load_weights(hf_model.state_dict().items())
    engine_config = EngineConfig(dtype="float32", device="cpu", **config)  # type: ignore[arg-type]
    return LLMEngine.build(engine_config, model_config, net)


@torch.no_grad()
def hf_greedy(hf_model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def run_all(
    engine: LLMEngine, prompts: list[list[int]], config: GenerationConfig = GREEDY
) -> list[list[int]]:
    ids = [engine.add_request(p, config) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids]


def random_prompts(num: int, vocab: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(low, high))] for _ in range(num)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    # untied: a tiny tied Llama's greedy output just repeats the last prompt token, which tells little
    return tiny_hf_model(request.param, tie_word_embeddings=False)


def test_greedy_matches_hf_with_chunked_prefill_and_mixed_batches(hf_model: torch.nn.Module) -> None:
    # a 16-token budget chunks long prompts and mixes decodes with prefill chunks in one step
    engine = make_engine(hf_model, cache_block_seq_len=4, max_prefill_token_num=16, session_len=128)
    prompts = random_prompts(6, hf_model.config.vocab_size)
    expected = [hf_greedy(hf_model, p, GREEDY.max_new_tokens or 0) for p in prompts]
    assert run_all(engine, prompts) == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_batch_equals_each_request_alone(hf_model: torch.nn.Module) -> None:
    prompts = random_prompts(8, hf_model.config.vocab_size, seed=1)
    together = run_all(make_engine(hf_model, cache_block_seq_len=8, session_len=128), prompts)
    alone = [run_all(make_engine(hf_model, cache_block_seq_len=8, session_len=128), [p])[0] for p in prompts]
    assert together == alone


def test_tiny_kv_cache_preempts_and_still_matches(hf_model: torch.nn.Module) -> None:
    # 12 blocks of 4 tokens cannot hold 6 requests of up to ~50 tokens: preemption by recompute kicks in
    engine = make_engine(hf_model, cache_block_seq_len=4, cache_max_entry_count=48, session_len=64)
    prompts = random_prompts(6, hf_model.config.vocab_size, seed=2, low=20, high=30)
    expected = [hf_greedy(hf_model, p, GREEDY.max_new_tokens or 0) for p in prompts]
    assert run_all(engine, prompts) == expected
    assert engine.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_caching_same_outputs_and_computes_only_unshared_tokens(hf_model: torch.nn.Module) -> None:
    vocab = hf_model.config.vocab_size
    shared = random_prompts(1, vocab, seed=3, low=40, high=40)[0]
    first, second = shared + [1, 2, 3], shared + [4, 5]
    plain = make_engine(hf_model, cache_block_seq_len=8, session_len=128)
    cached = make_engine(hf_model, cache_block_seq_len=8, session_len=128, enable_prefix_caching=True)
    assert run_all(cached, [first]) == run_all(plain, [first])
    computed_before = _tokens_computed(cached, second)
    assert (
        computed_before == len(second) - 40
    )  # the 5 full blocks of the shared 40 tokens came from the cache
    assert cached.stats().prefix_cache_hits == 40


def _tokens_computed(engine: LLMEngine, prompt: list[int]) -> int:
    """Run one request to completion; count the prompt tokens its first scheduled steps computed."""
    request_id = engine.add_request(prompt, GenerationConfig(max_new_tokens=1, ignore_eos=True))
    request = engine.requests[request_id]
    computed = 0
    while engine.has_unfinished():
        schedule = engine.scheduler.schedule()
        computed += sum(s.num_new_tokens for s in schedule.scheduled if s.request is request)
        engine._finish(engine._launch(schedule.scheduled, None))
    return computed


def test_abort_frees_blocks(hf_model: torch.nn.Module) -> None:
    engine = make_engine(hf_model, cache_block_seq_len=4, session_len=128)
    ids = [engine.add_request(p, GREEDY) for p in random_prompts(3, hf_model.config.vocab_size)]
    engine.step()
    out = engine.abort(ids[0])
    assert out is not None and out.finished and out.finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_bad_requests_are_clear_errors(hf_model: torch.nn.Module) -> None:
    engine = make_engine(hf_model, session_len=32)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request(list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="exceeds the context of 32"):
        engine.add_request([1, 2, 3], GenerationConfig(max_new_tokens=30))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 10_000], GREEDY)


def test_max_new_tokens_none_runs_to_session_end(hf_model: torch.nn.Module) -> None:
    engine = make_engine(hf_model, session_len=20)
    (tokens,) = run_all(engine, [[1, 2, 3, 4, 5]], GenerationConfig(max_new_tokens=None, ignore_eos=True))
    assert len(tokens) == 15
