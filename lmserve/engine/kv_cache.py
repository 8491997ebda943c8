"""BlockManager: paged KV-cache blocks with reference counts and a hash-chained prefix cache (LRU eviction)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmserve.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    """Set once the block is full and registered in the prefix cache."""


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained to its parent's so equal blocks only match with equal prefixes."""
    return hash((parent_hash, token_ids))


class BlockManager:
    """Hands out fixed-size KV blocks to requests.

    A block is in exactly one of: `_free` (never cached, or evicted), `_evictable`
    (ref_count 0 but still holding a cached prefix; reused on a hit, evicted LRU-first
    when the free list is empty), or in use (ref_count > 0).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"{num_blocks=} must be >= 1: the KV cache holds no block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------

    def match_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached run of the request's full blocks (prompt, and output after a preemption).

        A prompt that hits entirely gives back its last block, so at least one token is
        computed (the step that produces the first output token needs its logits).
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        num_full = request.num_tokens // self.block_size
        for i in range(num_full):
            parent = chain_hash(parent, request.block_tokens(i, self.block_size))
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        if hits and len(hits) * self.block_size >= request.num_tokens:
            hits.pop()
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += len(hits) * self.block_size
        return hits

    def take_prefix(self, request: Request, block_ids: list[int]) -> None:
        """Give the request the matched cached blocks; their tokens count as computed."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._evictable.pop(block_id, None)
            block.ref_count += 1
            request.block_table.append(block_id)
        request.num_computed_tokens = len(block_ids) * self.block_size
        request.num_cached_tokens = request.num_computed_tokens
        request.last_hashed_block = len(block_ids)
        request.last_block_hash = self.blocks[block_ids[-1]].block_hash if block_ids else None

    def cache_full_blocks(self, request: Request) -> None:
        """Register blocks the request has filled since last time (prompt and output alike)."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        for i in range(request.last_hashed_block, num_full):
            request.last_block_hash = chain_hash(
                request.last_block_hash, request.block_tokens(i, self.block_size)
            )
            block = self.blocks[request.block_table[i]]
            if block.block_hash is None and request.last_block_hash not in self._hash_to_block:
                block.block_hash = request.last_block_hash
                self._hash_to_block[request.last_block_hash] = block.block_id
        request.last_hashed_block = max(request.last_hashed_block, num_full)

    # -- allocation -----------------------------------------------------------------

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        needed = self.num_blocks_for(request.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(request.block_table))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(request, num_new_tokens) <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Grow the request's block table to hold num_new_tokens more tokens."""
        for _ in range(self.num_new_blocks(request, num_new_tokens)):
            request.block_table.append(self._pop_free_block())

    def free(self, request: Request) -> None:
        """Return the request's blocks; cached ones stay reusable until evicted. Last blocks go first."""
        for block_id in reversed(request.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None
        request.block_table = []
        request.last_hashed_block = 0
        request.last_block_hash = None

    def _pop_free_block(self) -> int:
        if self._free:
            block_id = self._free.pop()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            self._evict(block_id)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None and self._hash_to_block.get(block.block_hash) == block_id:
            del self._hash_to_block[block.block_hash]
        block.block_hash = None
