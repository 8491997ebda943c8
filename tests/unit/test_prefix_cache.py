"""Prefix-cache defects found in review: blocked admissions, first-token finishes, hash collisions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lmserve.engine import kv_cache
from lmserve.engine.kv_cache import BlockManager, chain_hash
from lmserve.engine.request import Request
from lmserve.generation import GenerationConfig
from tests.unit.test_scheduler import SAMPLED, make_request, make_scheduler, run_step

EOS = 2  # the EOS id make_scheduler gives its schedulers


def test_waiting_request_takes_cached_blocks_only_when_admitted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    scheduler = make_scheduler(bm)
    warmup = make_request("warmup", 8, max_new_tokens=1)
    running = make_request("running", 5, start=100, max_new_tokens=6)
    scheduler.add(warmup)
    scheduler.add(running)
    assert run_step(scheduler) == [("warmup", 8), ("running", 5)]
    cached = bm.match_prefix(make_request("probe", 9))
    assert warmup.is_finished and len(cached) == 2 and bm.num_free_blocks == 2  # both idle, evictable
    # head hits the 2 cached blocks but needs a 3rd, which `running` holds; second fits but queues behind
    head = Request("head", list(range(8)) + [50, 51, 52, 53], 12, GenerationConfig(), max_new_tokens=4)
    second = make_request("second", 4, start=200, max_new_tokens=4)
    scheduler.add(head)
    scheduler.add(second)
    for _ in range(3):  # running decodes its tokens 6..8 inside its 2 blocks
        assert run_step(scheduler) == [("running", 1)]
        assert head.block_table == [] and head.num_computed_tokens == 0
        assert bm.num_free_blocks == 2 and [bm.blocks[b].ref_count for b in cached] == [0, 0]
        assert (bm.num_prefix_queries, bm.num_prefix_hits) == (8 + 5, 0)  # a blocked head is not counted
    # running now needs a 3rd block: an idle cached one is free for it (holding them used to force a
    # self-preemption and "cannot fit in an empty KV cache", failing every request)
    for _ in range(50):
        if not scheduler.num_unfinished:
            break
        run_step(scheduler)
    assert all(r.is_finished and r.finish_reason == "length" for r in (running, head, second))
    assert [r.num_output_tokens for r in (running, head, second)] == [6, 4, 4]
    assert bm.num_free_blocks == 4 and all(block.ref_count == 0 for block in bm.blocks)
    # one query per admission: head (hitting its first block; the second was evicted for running's 3rd)
    # and second came in together, then head's growth preempted second, re-admitted with its 5 tokens
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (8 + 5 + 12 + 4 + 5, 4)


def test_can_allocate_counts_idle_hit_blocks_as_taken() -> None:
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    first = make_request("first", 8)
    bm.take_prefix(first, [])
    bm.allocate(first, 8)
    first.num_computed_tokens = 8
    bm.cache_full_blocks(first)
    bm.free(first)  # 1 free block + 2 idle cached ones
    longer = make_request("longer", 16)  # hits 2 blocks, needs 2 more: only 1 is free once it takes them
    hits = bm.match_prefix(longer)
    assert len(hits) == 2
    assert not bm.can_allocate(longer, 8, hits)
    assert bm.can_allocate(longer, 4, hits)  # 12 tokens: the hits and one new block
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (8, 0)  # looking counts nothing


@pytest.mark.parametrize(
    ("first_token", "max_new_tokens", "reason"), [(SAMPLED, 1, "length"), (EOS, 16, "stop")]
)
def test_request_ending_on_its_first_token_fills_the_prefix_cache(
    first_token: int, max_new_tokens: int, reason: str
) -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    scheduler = make_scheduler(bm)
    warmup = make_request("warmup", 9, max_new_tokens=max_new_tokens)
    scheduler.add(warmup)
    scheduler.update(scheduler.schedule().scheduled, [first_token])
    assert warmup.is_finished and warmup.finish_reason == reason
    again = make_request("again", 9)
    scheduler.add(again)
    assert run_step(scheduler) == [("again", 1)]  # its 2 full blocks came from the cache
    assert again.num_cached_tokens == 8 and bm.num_prefix_hits == 8


def test_hash_collision_is_a_miss_not_another_prompts_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache, "chain_hash", lambda parent, token_ids: b"\0" * 16)
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    scheduler = make_scheduler(bm)
    victim = make_request("victim", 9)
    scheduler.add(victim)
    run_step(scheduler)
    attacker = make_request("attacker", 9, start=100)  # every block "collides" with the victim's
    scheduler.add(attacker)
    assert run_step(scheduler) == [("victim", 1), ("attacker", 9)]
    assert attacker.num_cached_tokens == 0 and not set(attacker.block_table) & set(victim.block_table)
    assert all(bm.blocks[b].ref_count == 1 for b in victim.block_table + attacker.block_table)


def test_chain_hash_is_keyed_and_chained(monkeypatch: pytest.MonkeyPatch) -> None:
    root = chain_hash(None, (1, 2, 3, 4))
    assert isinstance(root, bytes) and len(root) == 16
    assert chain_hash(root, (5, 6, 7, 8)) != chain_hash(None, (5, 6, 7, 8))
    assert chain_hash(root, (5, 6, 7, 8)) != chain_hash(chain_hash(None, (1, 2, 3, 9)), (5, 6, 7, 8))
    monkeypatch.setattr(kv_cache, "_HASH_KEY", b"another process")
    assert chain_hash(None, (1, 2, 3, 4)) != root  # keys depend on the per-process secret


@pytest.mark.parametrize("module", ["scheduler.py", "kv_cache.py", "request.py"])
def test_scheduling_modules_do_not_import_torch_or_the_tokenizer(module: str) -> None:
    tree = ast.parse(Path(kv_cache.__file__).with_name(module).read_text())
    annotation_only = _type_checking_only(tree)
    imported = {name for node in ast.walk(tree) if id(node) not in annotation_only for name in _imports(node)}
    assert imported, "the walk found no import at all"
    assert not {name for name in imported if name.split(".")[0] in {"torch", "transformers", "tokenizers"}}
    assert not imported & {"lmserve.models.tokenizer", "lmserve.engine.detokenizer", "lmserve.engine.sampler"}


def _imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    return []


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Nodes inside `if TYPE_CHECKING:` blocks (annotations only; never imported at run time)."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    return {id(child) for block in blocks for child in ast.walk(block)}
