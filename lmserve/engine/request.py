"""Request: one generation's state inside the engine (tokens, progress, KV blocks)."""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmserve.generation import FinishReason, GenerationConfig, PromptThenOutput

if TYPE_CHECKING:  # the scheduler and block manager import this module and stay free of torch
    from concurrent.futures import Future

    import torch

    from lmserve.engine.detokenizer import TextStream
    from lmserve.structured.sequence import SequenceGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request(PromptThenOutput):
    """Phase-free progress: the first num_computed_tokens of token_ids (then of the pending tokens) have their
    K/V in the cache, or on its way there in a launched step."""

    request_id: str
    token_ids: list[int]
    """Prompt followed by the tokens generated so far."""
    num_prompt_tokens: int
    gen_config: GenerationConfig
    max_new_tokens: int
    """Resolved limit: min(gen_config.max_new_tokens, session_len - prompt length)."""
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    """Tokens sampled by a launched step but not read back yet (overlap scheduling): they are scheduled
    and computed like known tokens, but not in token_ids, so no count or stop check sees them."""
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    last_hashed_block: int = 0
    """Blocks of block_table registered in the prefix cache so far."""
    last_block_hash: bytes | None = None
    """Chain hash of the last registered block: the parent of the next one."""
    finish_reason: FinishReason | None = None
    lora_slot: int = 0
    """The LoRA adapter's slot (lmserve/lora: 0 is the base model), from gen_config.adapter_name."""
    pooling: str | None = None
    """An embedding request's pooling type (engine/pooling.py): its prompt is run once and pooled, no token sampled."""
    # per-request helpers owned by the engine
    generator: torch.Generator | None = None
    detokenizer: TextStream | None = None
    pooled: torch.Tensor | None = None
    """An embedding request's pooling state over the chunks computed so far (the runner keeps it)."""
    grammar_future: Future[Any] | None = None
    """The compiled grammar on its way (response_format); the request joins the scheduler when it is done."""
    grammar: SequenceGrammar | None = None
    _table_ints: array[int] | None = field(default=None, repr=False)
    _table_of: list[int] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_total_tokens(self) -> int:
        """Known tokens and the pending ones: what the scheduler computes up to."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def is_pooling(self) -> bool:
        return self.pooling is not None

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def block_tokens(self, index: int, block_size: int) -> tuple[int, ...]:
        return tuple(self.token_ids[index * block_size : (index + 1) * block_size])

    def block_table_ints(self) -> array[int]:
        """block_table as an int32 array, kept in step with it: the block manager only appends to the list or
        replaces it (free), so new entries are appended here and a new list is copied once. The step batch
        copies the arrays into its buffer as they are (converting 256 lists of ints was its largest cost)."""
        table, ints = self.block_table, self._table_ints
        if ints is None or self._table_of is not table or len(ints) > len(table):
            ints = self._table_ints = array("i", table)
            self._table_of = table
        elif len(ints) < len(table):
            ints.extend(table[len(ints) :])
        return ints
