"""Token-budget scheduler: continuous batching, chunked prefill, preemption by recompute."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmserve.engine.kv_cache import BlockManager
from lmserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens computed for this request this step (1 for a decode, a chunk for a prefill)."""

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    """Single-token entries first (decodes), then prefill chunks."""
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Each step hands out `max_prefill_token_num` tokens: running requests first, then waiting ones.

    Phase-free (vLLM v1 style): a request just needs `num_tokens - num_computed_tokens`
    more tokens computed, whether they are prompt or the last sampled token. When KV
    blocks run out, the most recently admitted running request is preempted: its blocks
    are freed and it goes back to the front of the queue to be recomputed later.
    """

    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_token_num: int) -> None:
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.token_budget = max_prefill_token_num
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.token_budget)
        self._schedule_waiting(output, budget)
        output.scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # stable: decodes first
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(request, num_new):
                victim = self.running[-1]
                self._preempt(victim, output)
                if victim is request:
                    break
            else:
                self.block_manager.allocate(request, num_new)
                output.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                index += 1
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            if not request.block_table:
                hits = self.block_manager.match_prefix(request)
                if hits:
                    self.block_manager.take_prefix(request, hits)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.block_manager.can_allocate(request, num_new):
                if not self.running and not output.scheduled:
                    # nothing will ever free blocks for it; the engine rejects such requests up front
                    raise RuntimeError(f"request {request.request_id} cannot fit in an empty KV cache")
                break
            self.waiting.popleft()
            self.block_manager.allocate(request, num_new)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        output.scheduled = [s for s in output.scheduled if s.request is not request]
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        output.preempted.append(request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        if request.block_table:
            self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
