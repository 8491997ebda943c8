"""BlockManager: paged KV-cache blocks with reference counts and a hash-chained prefix cache (LRU eviction)."""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from lmserve.engine.request import Request

# A per-process secret key: nobody outside can predict block hashes, so nobody can craft a prompt whose
# blocks collide with another user's and be served their KV.
_HASH_KEY = os.urandom(16)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    """Set once the block is full and registered in the prefix cache."""
    token_ids: tuple[int, ...] | None = None
    """The tokens the block holds, set with block_hash: a hit must match them, not just the hash."""


def chain_hash(parent_hash: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """Keyed 128-bit BLAKE2b of a full block, chained to its parent's so equal blocks only match with equal prefixes."""
    digest = hashlib.blake2b(digest_size=16, key=_HASH_KEY)
    if parent_hash is not None:
        digest.update(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def prefix_root(request: Request) -> bytes | None:
    """The parent hash of a request's first block: None for the base model, a per-adapter key for a LoRA
    adapter, so the same tokens under different adapters (different K/V) never share cached blocks."""
    adapter = request.gen_config.adapter_name
    if adapter is None:
        return None
    return hashlib.blake2b(b"lora-adapter\0" + adapter.encode(), digest_size=16, key=_HASH_KEY).digest()


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
        self._hash_to_block: dict[bytes, int] = {}
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

        Only looks: nothing is taken or counted until `take_prefix` on admission. A prompt that
        hits entirely gives back its last block, so at least one token is computed (the step
        that produces the first output token needs its logits).
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = prefix_root(request)
        for i in range(request.num_tokens // self.block_size):
            token_ids = request.block_tokens(i, self.block_size)
            parent = chain_hash(parent, token_ids)
            block_id = self._cached_block(parent, token_ids)
            if block_id is None:
                break
            hits.append(block_id)
        if hits and len(hits) * self.block_size >= request.num_tokens:
            hits.pop()
        return hits

    def take_prefix(self, request: Request, block_ids: Sequence[int]) -> None:
        """Admit the request onto the matched cached blocks (maybe none); their tokens count as computed.

        Called once per admission, so the prefix-cache statistics count each admission once.
        """
        assert not request.block_table, f"request {request.request_id} already holds blocks"
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
        if self.enable_prefix_caching:
            self.num_prefix_queries += request.num_tokens
            self.num_prefix_hits += request.num_computed_tokens

    def _cached_block(self, block_hash: bytes, token_ids: tuple[int, ...]) -> int | None:
        block_id = self._hash_to_block.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return None  # a hash collision is a miss, never another prompt's KV
        return block_id

    def cache_full_blocks(self, request: Request) -> None:
        """Register blocks the request has filled since last time (prompt and output alike)."""
        if not self.enable_prefix_caching:
            return
        # a pending token (computed, not read back yet) is not known: its block waits
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        for i in range(request.last_hashed_block, num_full):
            token_ids = request.block_tokens(i, self.block_size)
            parent = request.last_block_hash if i else prefix_root(request)
            block_hash = chain_hash(parent, token_ids)
            request.last_block_hash = block_hash
            block = self.blocks[request.block_table[i]]
            if block.block_hash is None and block_hash not in self._hash_to_block:
                block.block_hash, block.token_ids = block_hash, token_ids
                self._hash_to_block[block_hash] = block.block_id
        request.last_hashed_block = max(request.last_hashed_block, num_full)

    # -- allocation -----------------------------------------------------------------

    def num_new_blocks(self, request: Request, num_new_tokens: int, num_hit_blocks: int = 0) -> int:
        """Blocks to allocate for num_new_tokens more tokens, after num_hit_blocks cached ones are taken."""
        num_computed = request.num_computed_tokens + num_hit_blocks * self.block_size
        needed = self.num_blocks_for(num_computed + num_new_tokens)
        return max(0, needed - len(request.block_table) - num_hit_blocks)

    def can_allocate(self, request: Request, num_new_tokens: int, prefix_hits: Sequence[int] = ()) -> bool:
        """Whether num_new_tokens more tokens fit, after taking prefix_hits (from `match_prefix`, not taken yet).

        Hit blocks need no allocation, but those idle in the evictable LRU are counted in
        num_free_blocks and stop being free for this request's new blocks once it takes them.
        """
        num_idle_hits = sum(1 for block_id in prefix_hits if self.blocks[block_id].ref_count == 0)
        num_new = self.num_new_blocks(request, num_new_tokens, len(prefix_hits))
        return num_new <= self.num_free_blocks - num_idle_hits

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
        block.block_hash, block.token_ids = None, None
