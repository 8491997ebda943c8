"""Overlap scheduling on tiny random models: the same outputs as the synchronous loop, and HF's greedy tokens.

The overlapped loop runs on the CPU with CPU tensors through the same code as on CUDA (placeholder input ids
filled from the previous step's sampled tensor, tokens read back a step later), so CI exercises it.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import pytest
import torch

from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig, TokenLogprob
from tests.engine.test_engine_tiny import GREEDY, hf_greedy, make_engine, random_prompts
from tests.models.model_helpers import tiny_hf_model


@dataclass
class Finished:
    """Everything a request streamed, and how it ended."""

    token_ids: list[int]
    finish_reason: str | None
    num_generated_tokens: int
    logprobs: list[TokenLogprob]


def run(
    engine: LLMEngine,
    prompts: list[list[int]],
    configs: list[GenerationConfig],
    abort_after: dict[int, int] | None = None,
) -> list[Finished]:
    """Run the requests to the end; abort_after {request index: its tokens streamed before it is aborted}."""
    ids = [engine.add_request(p, c) for p, c in zip(prompts, configs, strict=True)]
    results = {i: Finished([], None, 0, []) for i in ids}
    abort_at = {ids[index]: count for index, count in (abort_after or {}).items()}

    def take(out: object) -> None:
        result = results[out.request_id]  # type: ignore[attr-defined]
        result.token_ids += out.token_ids  # type: ignore[attr-defined]
        result.logprobs += out.logprobs or []  # type: ignore[attr-defined]
        result.num_generated_tokens = out.num_generated_tokens  # type: ignore[attr-defined]
        if out.finished:  # type: ignore[attr-defined]
            result.finish_reason = out.finish_reason  # type: ignore[attr-defined]

    while engine.has_unfinished():
        for out in engine.step():
            take(out)
        for request_id, count in abort_at.items():
            if results[request_id].finish_reason is None and len(results[request_id].token_ids) >= count:
                take(engine.abort(request_id))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(r.num_pending_tokens == 0 for r in engine.scheduler.running)
    return [results[i] for i in ids]


def both_ways(hf_model: torch.nn.Module, *args: object, **config: object) -> tuple[list[Finished], LLMEngine]:
    """The outputs of the synchronous and the overlapped engine agree; returns them and the overlapped one."""
    sync = make_engine(hf_model, overlap_schedule=False, **config)
    overlapped = make_engine(hf_model, overlap_schedule=True, **config)
    expected = run(sync, *args)  # type: ignore[arg-type]
    got = run(overlapped, *args)  # type: ignore[arg-type]
    assert got == expected
    assert overlapped.num_steps >= sync.num_steps  # a request that stops wastes the slot launched behind it
    return got, overlapped


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_hf_model(request.param, tie_word_embeddings=False)


def test_overlap_is_off_by_default_and_the_first_step_returns_nothing(
    hf_model: torch.nn.Module,
) -> None:
    assert not make_engine(hf_model).overlap
    engine = make_engine(hf_model, overlap_schedule=True)
    engine.add_request([1, 2, 3], GREEDY)
    assert engine.step() == []  # launched; its token is read back by the next step, which runs behind it
    (out,) = engine.step()
    assert out.token_ids == hf_greedy(hf_model, [1, 2, 3], 1)
    assert engine.scheduler.running[0].num_pending_tokens == 1


def test_greedy_matches_hf_with_chunked_prefill_mixed_batches_and_lengths(hf_model: torch.nn.Module) -> None:
    prompts = random_prompts(6, hf_model.config.vocab_size, seed=3)
    lengths = [1, 2, 12, 5, 9, 3]
    configs = [GREEDY.with_updates(max_new_tokens=n) for n in lengths]
    got, _ = both_ways(
        hf_model, prompts, configs, cache_block_seq_len=4, max_prefill_token_num=16, session_len=128
    )
    for prompt, n, result in zip(prompts, lengths, got, strict=True):
        assert result.token_ids == hf_greedy(hf_model, prompt, n)
        assert result.finish_reason == "length" and result.num_generated_tokens == n


def test_stop_tokens_end_requests_while_the_next_step_runs(hf_model: torch.nn.Module) -> None:
    prompts = random_prompts(5, hf_model.config.vocab_size, seed=4)
    greedy = [hf_greedy(hf_model, p, 12) for p in prompts]
    # each request stops at its own 3rd greedy token; min_new_tokens=4 bans it until then on one of them
    configs = [GREEDY.with_updates(stop_token_ids=(tokens[2],)) for tokens in greedy]
    configs[0] = configs[0].with_updates(min_new_tokens=4)
    got, _ = both_ways(hf_model, prompts, configs, cache_block_seq_len=4, session_len=128)
    for result, tokens in zip(got[1:], greedy[1:], strict=True):
        assert result.finish_reason == "stop"
        assert result.token_ids == tokens[: tokens.index(tokens[2]) + 1]
    assert len(got[0].token_ids) >= 4


def test_tiny_kv_cache_preempts_requests_with_tokens_in_flight(hf_model: torch.nn.Module) -> None:
    prompts = random_prompts(6, hf_model.config.vocab_size, seed=2, low=20, high=30)
    configs = [GREEDY] * len(prompts)
    got, engine = both_ways(
        hf_model, prompts, configs, cache_block_seq_len=4, cache_max_entry_count=48, session_len=64
    )
    assert engine.num_preemptions > 0
    assert [r.token_ids for r in got] == [hf_greedy(hf_model, p, 12) for p in prompts]


def test_prefix_caching_with_overlap(hf_model: torch.nn.Module) -> None:
    shared = random_prompts(1, hf_model.config.vocab_size, seed=5, low=20, high=20)[0]
    prompts = [shared + tail for tail in random_prompts(4, hf_model.config.vocab_size, seed=6, low=2, high=6)]
    config = {"cache_block_seq_len": 4, "enable_prefix_caching": True, "session_len": 128}
    sync = make_engine(hf_model, overlap_schedule=False, **config)
    overlapped = make_engine(hf_model, overlap_schedule=True, **config)
    first = run(overlapped, prompts[:1], [GREEDY])[0]
    assert first == run(sync, prompts[:1], [GREEDY])[0]
    # the first request's prompt and output are cached (never a placeholder): its continuation hits them all
    batch = [*prompts[1:], prompts[0] + first.token_ids[:8]]
    got = run(overlapped, batch, [GREEDY] * len(batch))
    assert got == run(sync, batch, [GREEDY] * len(batch))
    assert overlapped.stats().prefix_cache_hits == sync.stats().prefix_cache_hits >= 4 * 20 + 4
    assert [r.token_ids for r in got] == [hf_greedy(hf_model, p, 12) for p in batch]


def test_aborts_with_a_step_in_flight(hf_model: torch.nn.Module) -> None:
    prompts = random_prompts(4, hf_model.config.vocab_size, seed=7)
    configs = [GREEDY] * len(prompts)
    # aborted once 1, 3, 2 tokens have streamed: overlapped, the next token of each is in flight then
    got, _ = both_ways(hf_model, prompts, configs, {0: 1, 1: 3, 2: 2}, cache_block_seq_len=4)
    assert [r.finish_reason for r in got] == ["abort", "abort", "abort", "length"]
    assert [r.num_generated_tokens for r in got] == [len(r.token_ids) for r in got] == [1, 3, 2, 12]
    for prompt, result in zip(prompts, got, strict=True):
        assert result.token_ids == hf_greedy(hf_model, prompt, 12)[: len(result.token_ids)]


def test_logprobs_and_seeded_sampling_agree(hf_model: torch.nn.Module) -> None:
    prompts = random_prompts(4, hf_model.config.vocab_size, seed=8)
    configs = [
        GREEDY.with_updates(logprobs=3),
        GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, random_seed=11),
        GenerationConfig(max_new_tokens=7, do_sample=True, top_p=0.9, random_seed=12, logprobs=0),
        GREEDY,
    ]
    got, _ = both_ways(hf_model, prompts, configs, cache_block_seq_len=4)
    assert [len(r.logprobs) for r in got] == [12, 0, 7, 0]
    assert all(lp.token_id == t for lp, t in zip(got[0].logprobs, got[0].token_ids, strict=True))


def test_penalties_fall_back_to_known_tokens(hf_model: torch.nn.Module) -> None:
    # these rows sample from their own earlier tokens: the engine reads each step back before the next
    prompts = random_prompts(3, hf_model.config.vocab_size, seed=9)
    favoured = GREEDY.with_updates(max_new_tokens=6, logit_bias={5: 3.0})
    configs = [
        favoured.with_updates(
            presence_penalty=2.0, frequency_penalty=2.0
        ),  # 5 first, then never again: the penalty saw it
        GREEDY.with_updates(repetition_penalty=3.0, frequency_penalty=0.5),
        GREEDY,
    ]
    got, _ = both_ways(hf_model, prompts, configs, cache_block_seq_len=4)
    assert got[0].token_ids[0] == 5 and 5 not in got[0].token_ids[1:]
    assert got[1].token_ids != hf_greedy(hf_model, prompts[1], 12)  # the penalties are felt
    assert got[2].token_ids == hf_greedy(hf_model, prompts[2], 12)


def test_overlap_with_tp_is_a_clear_error() -> None:
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import overlap_enabled

    assert overlap_enabled(EngineConfig(overlap_schedule=True))
    # unset: on for one CUDA device only
    assert overlap_enabled(EngineConfig(), torch.device("cuda", 0))
    assert not overlap_enabled(EngineConfig(), torch.device("cpu"))
    assert not overlap_enabled(EngineConfig(tp=2), torch.device("cuda", 0))
    assert not overlap_enabled(EngineConfig(overlap_schedule=False), torch.device("cuda", 0))
    with pytest.raises(ValueError, match="overlap_schedule needs tp=1"):
        overlap_enabled(EngineConfig(tp=2, overlap_schedule=True))


def test_an_overlapped_step_calls_nothing_that_waits_for_the_device(hf_model: torch.nn.Module) -> None:
    # the CPU attention backend reads host lengths (it never runs under overlap on CUDA): its ops are skipped
    from tests.unit.test_sampler import _SyncingOps

    class OutsideTheCpuBackend(_SyncingOps):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen = len(self.seen)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.seen) > seen and any(
                "torch_backend.py" in f.filename for f in traceback.extract_stack()
            ):
                self.seen.pop()
            return out

    engine = make_engine(hf_model, overlap_schedule=True, enable_prefix_caching=True, cache_block_seq_len=4)
    engine.add_request([1, 2, 3, 4], GREEDY.with_updates(min_new_tokens=12))
    engine.add_request([5, 6, 7], GenerationConfig(max_new_tokens=9, logprobs=3, top_p=0.8, random_seed=1))
    engine.add_request([5, 6, 9, 9], GREEDY.with_updates(logit_bias={3: 1.0}, stop_token_ids=(4,)))
    with OutsideTheCpuBackend() as ops:
        while engine.has_unfinished():
            engine.step()
    assert ops.seen == []
