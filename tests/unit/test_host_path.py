"""The engine's fast host paths against the general ones they stand in for: the step batch from int32 arrays
and from lists (equal and unequal table widths), overlapped decode input ids taken as a slice of the previous
step's tokens against the device fill, `Request.block_table_ints` through appends, frees and re-admission,
the scheduler's decode fast path against the block manager's own answer, and the banned tokens per row."""

from __future__ import annotations

import random
from array import array

import pytest
import torch

from lmserve.attention.metadata import SequenceChunk, build_step_batch
from lmserve.engine.kv_cache import BlockManager
from lmserve.engine.request import Request
from lmserve.engine.runner import _feed_placeholders, _fill_placeholders
from lmserve.engine.sampler import SamplingBatch, SamplingRequest
from lmserve.engine.scheduler import Scheduler
from lmserve.generation import GenerationConfig

CPU = torch.device("cpu")


def random_chunks(seed: int, num: int, equal_widths: bool, decodes_only: bool) -> list[SequenceChunk]:
    rng = random.Random(seed)
    chunks = []
    for i in range(num):
        n = 1 if decodes_only or i < num // 2 else rng.randrange(1, 9)
        start = 40 if equal_widths else rng.randrange(0, 60)
        blocks = -(-(start + n) // 8) + (0 if equal_widths else rng.randrange(0, 2))
        table = rng.sample(range(1000), blocks)
        tokens = [rng.randrange(-num, 500) for _ in range(n)]
        chunks.append(SequenceChunk(tokens, start, table, samples=rng.random() < 0.8))
    return chunks


def flat(batch: object) -> list[list[int]]:
    meta = batch.metadata  # type: ignore[attr-defined]
    tensors = [batch.input_ids, batch.positions, batch.logits_indices]  # type: ignore[attr-defined]
    tensors += [meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables.flatten()]
    return [t.tolist() for t in tensors] + [list(meta.block_tables.shape)]


def reference_batch(chunks: list[SequenceChunk], block_size: int) -> list[list[int]]:
    """The layout built by hand, one token at a time."""
    ids, positions, slots, logits, starts, lens = [], [], [], [], [0], []
    for tokens, start, table, samples in chunks:
        for offset, token in enumerate(tokens):
            position = start + offset
            ids.append(token)
            positions.append(position)
            slots.append(table[position // block_size] * block_size + position % block_size)
        if samples:
            logits.append(len(ids) - 1)
        starts.append(len(ids))
        lens.append(start + len(tokens))
    width = max(len(c.block_table) for c in chunks)
    tables = [x for c in chunks for x in [*c.block_table, *[0] * (width - len(c.block_table))]]
    return [ids, positions, logits, slots, starts, lens, tables, [len(chunks), width]]


@pytest.mark.parametrize("equal_widths", [True, False])
@pytest.mark.parametrize("decodes_only", [True, False])
def test_step_batch_from_arrays_and_lists_matches_the_hand_layout(
    equal_widths: bool, decodes_only: bool
) -> None:
    chunks = random_chunks(3, 37, equal_widths, decodes_only)
    as_arrays = [c._replace(block_table=array("i", c.block_table)) for c in chunks]
    expected = reference_batch(chunks, 8)
    assert flat(build_step_batch(chunks, 8, CPU)) == expected
    assert flat(build_step_batch(as_arrays, 8, CPU)) == expected
    meta = build_step_batch(as_arrays, 8, CPU).metadata
    assert meta.num_decodes == (37 if decodes_only else 37 // 2)


@pytest.mark.parametrize(
    "tokens",
    [
        [[-1], [-2], [-3], [-4]],  # the overlapped decode batch: rows 0.. in order (a slice)
        [[-3], [-4], [-5]],  # rows 2..4 (a slice from an offset: earlier rows finished)
        [[-2], [-1], [-3]],  # out of order: the device fill
        [[-1], [7], [-2]],  # a known token among them
        [[-1], [-2], [5, 6, -3]],  # a prefill chunk ending in a pending token
        [[4], [5, 6]],  # no placeholder
    ],
)
def test_placeholders_fed_from_the_host_match_the_device_fill(tokens: list[list[int]]) -> None:
    feed = torch.tensor([100, 101, 102, 103, 104, 105])
    chunks = [SequenceChunk(t, i, [i]) for i, t in enumerate(tokens)]
    batch = build_step_batch(chunks, 8, CPU)
    expected = _fill_placeholders(batch, feed).input_ids.tolist()
    assert _feed_placeholders(batch, chunks, feed).input_ids.tolist() == expected
    assert min(expected) >= 0


def test_block_table_ints_follow_appends_frees_and_readmission() -> None:
    request = Request("r", list(range(10)), 10, GenerationConfig(), 100)
    manager = BlockManager(16, 4)
    for num_new in (10, 1, 1, 3, 8):
        manager.allocate(request, num_new)
        request.num_computed_tokens += num_new
        assert list(request.block_table_ints()) == request.block_table
    manager.free(request)
    assert list(request.block_table_ints()) == request.block_table == []
    request.num_computed_tokens = 0
    manager.allocate(request, 5)
    assert list(request.block_table_ints()) == request.block_table


def test_decode_fast_path_schedules_as_the_block_manager_would() -> None:
    """A scheduler of tiny blocks steps requests past many block boundaries, with preemption."""
    manager = BlockManager(24, 4)
    scheduler = Scheduler(manager, 8, 64, (), 1000)
    rng = random.Random(5)
    requests = [
        Request(
            f"r{i}", [rng.randrange(10, 90) for _ in range(rng.randrange(1, 9))], 0, GenerationConfig(), 12
        )
        for i in range(6)
    ]
    for request in requests:
        request.num_prompt_tokens = len(request.token_ids)
        scheduler.add(request)
    for _ in range(40):
        out = scheduler.schedule()
        for s in out.scheduled:
            need = manager.num_blocks_for(s.request.num_computed_tokens + s.num_new_tokens)
            assert len(s.request.block_table) == need  # exactly what allocate() would hold
        sampled = scheduler.update(out.scheduled, [rng.randrange(10, 90) for s in out.scheduled if s.samples])
        assert all(t.request.num_pending_tokens == 0 for t in sampled)
        if not scheduler.num_unfinished:
            break
    assert not scheduler.num_unfinished and manager.num_free_blocks == manager.num_blocks


def test_banned_tokens_per_row_with_shared_and_own_configs() -> None:
    shared = GenerationConfig(min_new_tokens=3, stop_token_ids=[7, 9000], max_new_tokens=8)
    ignoring = GenerationConfig(ignore_eos=True, max_new_tokens=8)
    rows = [
        SamplingRequest(shared, [1, 2], 2),  # before min_new_tokens: EOS and stop ids (9000 is outside)
        SamplingRequest(shared, [1, 2, 3, 4, 5], 2),  # reached it
        SamplingRequest(shared, [1, 2, 3], 2, num_pending_tokens=1),  # 1 + 1 pending < 3
        SamplingRequest(ignoring, [1], 1),  # EOS always
        SamplingRequest(GenerationConfig(), [1], 1),  # nothing
        SamplingRequest(GenerationConfig(min_new_tokens=1, stop_token_ids=[2]), [1], 1),  # its own config
    ]
    batch = SamplingBatch.build(rows, (2, 5), 100, "cpu")
    assert batch.banned_rows is not None and batch.banned_token_ids is not None
    pairs = list(zip(batch.banned_rows.tolist(), batch.banned_token_ids.tolist(), strict=True))
    assert pairs == [(0, 2), (0, 5), (0, 7), (2, 2), (2, 5), (2, 7), (3, 2), (3, 5), (5, 2), (5, 5)]
    assert batch.all_greedy and batch.temperature is None and batch.top_k is None
