"""BlockManager and Scheduler without a model: allocation, freeing, prefix cache, chunking, preemption."""

from __future__ import annotations

import pytest

from lmserve.engine.kv_cache import BlockManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.scheduler import Scheduler
from lmserve.generation import GenerationConfig

SAMPLED = 7
"""The token every fake model step samples (not an EOS id of these schedulers)."""


def make_request(request_id: str, num_prompt: int, start: int = 0, max_new_tokens: int = 16) -> Request:
    tokens = list(range(start, start + num_prompt))
    return Request(request_id, tokens, num_prompt, GenerationConfig(), max_new_tokens=max_new_tokens)


def make_scheduler(
    block_manager: BlockManager, max_batch_size: int = 8, max_prefill_token_num: int = 100
) -> Scheduler:
    return Scheduler(
        block_manager, max_batch_size, max_prefill_token_num, eos_token_ids={2}, session_len=1024
    )


def run_step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """Schedule, then pretend the model ran: the real Scheduler.update with token SAMPLED where due."""
    out = scheduler.schedule()
    num_sampling = sum(s.samples for s in out.scheduled)
    scheduler.update(out.scheduled, [SAMPLED] * num_sampling)
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    r = make_request("a", 10)
    assert bm.can_allocate(r, 10)
    bm.allocate(r, 10)
    assert len(r.block_table) == 3 and bm.num_free_blocks == 5
    r.num_computed_tokens = 10
    bm.allocate(r, 2)  # 12 tokens still fit in 3 blocks
    assert len(r.block_table) == 3
    bm.allocate(r, 3)
    assert len(r.block_table) == 4
    bm.free(r)
    assert bm.num_free_blocks == 8 and r.block_table == []


def test_cannot_allocate_beyond_capacity() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    r = make_request("a", 9)
    assert not bm.can_allocate(r, 9)
    assert bm.can_allocate(r, 8)


def test_zero_blocks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)


def test_prefix_cache_hit_shares_blocks_and_counts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = make_request("a", 10)
    bm.allocate(first, 10)
    first.num_computed_tokens = 10
    bm.cache_full_blocks(first)  # blocks 0 and 1 are full (8 tokens)
    second = make_request("b", 11)  # same first 10 tokens + one more
    hits = bm.match_prefix(second)
    assert hits == first.block_table[:2]
    bm.take_prefix(second, hits)
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert bm.blocks[hits[0]].ref_count == 2
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 16
    # freed cached blocks stay findable until evicted
    third = make_request("c", 9)
    assert bm.match_prefix(third) == hits


def test_full_prompt_hit_leaves_one_block_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = make_request("a", 8)
    bm.allocate(first, 8)
    first.num_computed_tokens = 8
    bm.cache_full_blocks(first)
    again = make_request("b", 8)
    assert len(bm.match_prefix(again)) == 1


def test_eviction_reuses_least_recently_freed_cached_block() -> None:
    bm = BlockManager(num_blocks=2, block_size=4, enable_prefix_caching=True)
    r = make_request("a", 8)
    bm.allocate(r, 8)
    r.num_computed_tokens = 8
    bm.cache_full_blocks(r)
    bm.free(r)
    other = make_request("b", 8, start=100)
    bm.allocate(other, 8)  # evicts both cached blocks
    assert bm.match_prefix(make_request("c", 8)) == []


def test_long_prompt_is_chunked_under_the_budget() -> None:
    scheduler = make_scheduler(BlockManager(64, 4), max_prefill_token_num=16)
    scheduler.add(make_request("long", 40))
    assert run_step(scheduler) == [("long", 16)]
    assert run_step(scheduler) == [("long", 16)]
    assert run_step(scheduler) == [("long", 8)]  # last chunk samples the first token
    assert run_step(scheduler) == [("long", 1)]  # now decoding


def test_decodes_first_then_prefill_chunk_in_one_step() -> None:
    scheduler = make_scheduler(BlockManager(64, 4), max_prefill_token_num=10)
    scheduler.add(make_request("a", 3))
    scheduler.add(make_request("b", 4))
    assert run_step(scheduler) == [("a", 3), ("b", 4)]
    scheduler.add(make_request("c", 20))
    # a and b decode (1 token each), c gets the remaining 8 tokens of the budget
    assert run_step(scheduler) == [("a", 1), ("b", 1), ("c", 8)]


def test_max_batch_size_limits_running_requests() -> None:
    scheduler = make_scheduler(BlockManager(64, 4), max_batch_size=2)
    for name in "abc":
        scheduler.add(make_request(name, 3))
    assert [name for name, _ in run_step(scheduler)] == ["a", "b"]
    assert len(scheduler.waiting) == 1


def test_preemption_when_blocks_run_out_and_resume() -> None:
    scheduler = make_scheduler(BlockManager(4, 4))
    a, b = make_request("a", 4), make_request("b", 4, start=50)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)  # each uses 1 block and samples a token: now 5 tokens each
    run_step(scheduler)  # decodes need a 2nd block each: 4 blocks used
    for _ in range(3):
        run_step(scheduler)  # tokens 6..8 fit in the 2 blocks
    out = scheduler.schedule()  # both need a 3rd block; only b... none free: b is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    scheduler.finish(a, "abort")
    assert scheduler.block_manager.num_free_blocks == 4
    num_tokens = b.num_tokens
    assert run_step(scheduler) == [("b", num_tokens)]  # recomputes prompt + its outputs


def test_finish_frees_waiting_and_running() -> None:
    bm = BlockManager(8, 4)
    scheduler = make_scheduler(bm, max_batch_size=1)
    a, b = make_request("a", 5), make_request("b", 5)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.finish(b, "abort")  # still waiting
    scheduler.finish(a, "abort")  # running
    assert bm.num_free_blocks == 8 and scheduler.num_unfinished == 0


def _first_tokens(gen_config: GenerationConfig, tokens: list[int], session_len: int = 1024) -> Request:
    """A 4-token request decoding the given tokens through Scheduler.update until it stops."""
    scheduler = Scheduler(BlockManager(64, 4), 8, 100, eos_token_ids={2}, session_len=session_len)
    request = Request("r", [10, 11, 12, 13], 4, gen_config, max_new_tokens=8)
    scheduler.add(request)
    for token in tokens:
        (sampled,) = scheduler.update(scheduler.schedule().scheduled, [token])
        assert sampled.request is request and sampled.token_id == token
        if request.is_finished:
            break
    return request


@pytest.mark.parametrize(
    ("gen_config", "tokens", "num_output", "reason"),
    [
        (GenerationConfig(), [5, 2, 5], 2, "stop"),  # EOS
        (GenerationConfig(ignore_eos=True), [2] * 9, 8, "length"),  # max_new_tokens
        (GenerationConfig(stop_token_ids=[5]), [4, 5, 4], 2, "stop"),
        (GenerationConfig(min_new_tokens=2), [2, 2, 2, 4], 3, "stop"),  # EOS counts after 2 tokens
    ],
)
def test_update_stops_on_tokens_and_lengths(
    gen_config: GenerationConfig, tokens: list[int], num_output: int, reason: str
) -> None:
    request = _first_tokens(gen_config, tokens)
    assert request.is_finished and request.finish_reason == reason
    assert request.output_token_ids == tokens[:num_output] and request.block_table == []


def test_update_stops_at_the_session_length() -> None:
    request = _first_tokens(GenerationConfig(), [5] * 8, session_len=7)
    assert request.finish_reason == "length" and request.output_token_ids == [5, 5, 5]


def test_update_advances_progress_and_returns_only_sampled_rows() -> None:
    scheduler = make_scheduler(BlockManager(64, 4), max_prefill_token_num=6)
    short, long = make_request("short", 3), make_request("long", 10, start=20)
    scheduler.add(short)
    scheduler.add(long)
    out = scheduler.schedule()  # short's whole prompt (samples), 3 tokens of long's (does not)
    sampled = scheduler.update(out.scheduled, [SAMPLED])
    assert [(s.request.request_id, s.token_id) for s in sampled] == [("short", SAMPLED)]
    assert (short.num_computed_tokens, long.num_computed_tokens) == (3, 3)
    assert short.output_token_ids == [SAMPLED] and long.output_token_ids == []


def test_finish_again_replaces_the_reason_only() -> None:
    bm = BlockManager(8, 4)
    scheduler = make_scheduler(bm)
    request = make_request("a", 4, max_new_tokens=1)
    scheduler.add(request)
    run_step(scheduler)
    assert request.finish_reason == "length" and bm.num_free_blocks == 8
    scheduler.finish(request, "stop")  # a stop string completed by the same token
    assert request.finish_reason == "stop" and bm.num_free_blocks == 8 and scheduler.num_unfinished == 0
