"""Request: one generation's state inside the engine (tokens, progress, KV blocks)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from lmserve.generation import FinishReason, GenerationConfig, PromptThenOutput


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request(PromptThenOutput):
    """Phase-free progress: the first num_computed_tokens of token_ids have their K/V in the cache."""

    request_id: str
    token_ids: list[int]
    """Prompt followed by the tokens generated so far."""
    num_prompt_tokens: int
    gen_config: GenerationConfig
    max_new_tokens: int
    """Resolved limit: min(gen_config.max_new_tokens, session_len - prompt length)."""
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    last_hashed_block: int = 0
    last_block_hash: int | None = None
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    # per-request helpers owned by the engine (sampling generator, detokenizer)
    generator: Any = None
    detokenizer: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def block_tokens(self, index: int, block_size: int) -> tuple[int, ...]:
        return tuple(self.token_ids[index * block_size : (index + 1) * block_size])
