"""BlockManager and Scheduler without a model: allocation, freeing, prefix cache, chunking, preemption."""

from __future__ import annotations

import pytest

from lmserve.engine.kv_cache import BlockManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.scheduler import Scheduler
from lmserve.generation import GenerationConfig


def make_request(request_id: str, num_prompt: int, start: int = 0) -> Request:
    tokens = list(range(start, start + num_prompt))
    return Request(request_id, tokens, num_prompt, GenerationConfig(), max_new_tokens=16)


def run_step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """Schedule, then pretend the model ran: advance progress and sample token 7 where due."""
    out = scheduler.schedule()
    for s in out.scheduled:
        samples = s.samples
        s.request.num_computed_tokens += s.num_new_tokens
        if samples:
            s.request.token_ids.append(7)
        scheduler.block_manager.cache_full_blocks(s.request)
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
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_token_num=16)
    scheduler.add(make_request("long", 40))
    assert run_step(scheduler) == [("long", 16)]
    assert run_step(scheduler) == [("long", 16)]
    assert run_step(scheduler) == [("long", 8)]  # last chunk samples the first token
    assert run_step(scheduler) == [("long", 1)]  # now decoding


def test_decodes_first_then_prefill_chunk_in_one_step() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_token_num=10)
    scheduler.add(make_request("a", 3))
    scheduler.add(make_request("b", 4))
    assert run_step(scheduler) == [("a", 3), ("b", 4)]
    scheduler.add(make_request("c", 20))
    # a and b decode (1 token each), c gets the remaining 8 tokens of the budget
    assert run_step(scheduler) == [("a", 1), ("b", 1), ("c", 8)]


def test_max_batch_size_limits_running_requests() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=2, max_prefill_token_num=100)
    for name in "abc":
        scheduler.add(make_request(name, 3))
    assert [name for name, _ in run_step(scheduler)] == ["a", "b"]
    assert len(scheduler.waiting) == 1


def test_preemption_when_blocks_run_out_and_resume() -> None:
    scheduler = Scheduler(BlockManager(4, 4), max_batch_size=8, max_prefill_token_num=100)
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
    scheduler.finish(a)
    assert scheduler.block_manager.num_free_blocks == 4
    num_tokens = b.num_tokens
    assert run_step(scheduler) == [("b", num_tokens)]  # recomputes prompt + its outputs


def test_finish_frees_waiting_and_running() -> None:
    bm = BlockManager(8, 4)
    scheduler = Scheduler(bm, max_batch_size=1, max_prefill_token_num=100)
    a, b = make_request("a", 5), make_request("b", 5)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.finish(b)  # still waiting
    scheduler.finish(a)  # running
    assert bm.num_free_blocks == 8 and scheduler.num_unfinished == 0
