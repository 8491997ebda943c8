"""Token-budget scheduler: continuous batching, chunked prefill, preemption by recompute, stop checks."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from lmserve.engine.kv_cache import BlockManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.generation import FinishReason


class ScheduledRequest(NamedTuple):
    """One request's part of a step, with its facts as scheduled (they stay true after `commit` moves the
    request's progress). A named tuple made by `scheduled`: one per running request every step, and the
    runner, `commit` and pooling each read `samples` (as properties, recomputed, ~10 % of the host step)."""

    request: Request
    num_new_tokens: int
    """Tokens computed for this request this step (1 for a decode, a chunk for a prefill)."""
    reaches_end: bool
    """True when this step computes the last of the request's tokens."""
    samples: bool
    """True when a new token is sampled after this step (the end is reached, and it is no embedding)."""


def scheduled_request(request: Request, num_new_tokens: int) -> ScheduledRequest:
    """The request's part of the step about to be scheduled (before its progress moves)."""
    reaches_end = request.num_computed_tokens + num_new_tokens == request.num_total_tokens
    return ScheduledRequest(request, num_new_tokens, reaches_end, reaches_end and request.pooling is None)


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


class SampledToken(NamedTuple):
    """One token appended by `Scheduler.update`; `request.is_finished` says whether it ended the request.

    A named tuple: one is made per running request every step."""

    request: Request
    token_id: int


class Scheduler:
    """Each step hands out `max_prefill_token_num` tokens: running requests first, then waiting ones.

    Phase-free (vLLM v1 style): a request just needs `num_tokens - num_computed_tokens`
    more tokens computed, whether they are prompt or the last sampled token. When KV
    blocks run out, the most recently admitted running request is preempted: its blocks
    are freed and it goes back to the front of the queue to be recomputed later.

    The scheduler owns all token-level state (progress, sampled tokens, the prefix cache,
    stop tokens and lengths); the engine owns text (detokenizer, stop strings), which ends
    a request through `finish`.

    A step is applied in two halves, so the next one can be scheduled while it runs (overlap):
    `commit` when it is launched (progress moves, each sampling request gets a pending token) and
    `apply_tokens` when its tokens are read back (appended, stop checks). A running request with a
    pending token is scheduled a decode of it, unless that token ends it by length; a preempted one
    waits until its token is known.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int,
        max_prefill_token_num: int,
        eos_token_ids: Collection[int],
        session_len: int,
    ) -> None:
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.token_budget = max_prefill_token_num
        self.eos_token_ids = frozenset(eos_token_ids)
        self.session_len = session_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    # -- scheduling ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.token_budget)
        self._schedule_waiting(output, budget)
        if not all(s.num_new_tokens == 1 for s in output.scheduled):
            output.scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # stable: decodes first
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        block_size = self.block_manager.block_size
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_total = len(request.token_ids) + request.num_pending_tokens
            # _ends_by_length(request, request.num_pending_tokens), inline: it runs for every request every step
            if request.num_pending_tokens and (
                num_total - request.num_prompt_tokens >= request.max_new_tokens
                or num_total >= self.session_len
            ):
                index += 1  # its pending token is its last: nothing more to compute
                continue
            num_new = min(num_total - request.num_computed_tokens, budget)
            if request.num_computed_tokens + num_new <= len(request.block_table) * block_size:
                # the common decode: its blocks hold the new token already (can_allocate is True, allocate
                # takes nothing), so no block-manager call
                output.scheduled.append(scheduled_request(request, num_new))
                budget -= num_new
                index += 1
                continue
            while not self.block_manager.can_allocate(request, num_new):
                victim = self.running[-1]
                self._preempt(victim, output)
                if victim is request:
                    break
            else:
                self.block_manager.allocate(request, num_new)
                output.scheduled.append(scheduled_request(request, num_new))
                budget -= num_new
                index += 1
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted while its token was in flight: its prompt is not known in full yet
            # look up cached blocks without taking them: a request that must wait holds nothing;
            # an embedding needs every token's hidden state, so it takes no cached prefix
            hits = [] if request.is_pooling else self.block_manager.match_prefix(request)
            num_new = min(request.num_tokens - len(hits) * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(request, num_new, hits):
                if not self.running and not output.scheduled:
                    # nothing will ever free blocks for it; the engine rejects such requests up front
                    raise RuntimeError(f"request {request.request_id} cannot fit in an empty KV cache")
                break
            self.waiting.popleft()
            self._admit(request, hits, num_new)
            output.scheduled.append(scheduled_request(request, num_new))
            budget -= num_new

    def _admit(self, request: Request, prefix_hits: list[int], num_new_tokens: int) -> None:
        self.block_manager.take_prefix(request, prefix_hits)
        self.block_manager.allocate(request, num_new_tokens)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        output.scheduled = [s for s in output.scheduled if s.request is not request]
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        output.preempted.append(request)

    # -- after the model ran --------------------------------------------------------------

    def update(
        self, scheduled: Sequence[ScheduledRequest], sampled_token_ids: Sequence[int]
    ) -> list[SampledToken]:
        """Apply one model step at once (the synchronous loop): `commit`, then `apply_tokens`."""
        sampled = self.apply_tokens(self.commit(scheduled), sampled_token_ids)
        return [token for token in sampled if token is not None]

    def commit(self, scheduled: Sequence[ScheduledRequest]) -> list[Request]:
        """A step was launched: advance progress, cache filled blocks, give each sampling request a pending token.

        Returns the requests that sample, in order (`apply_tokens` takes their tokens). An embedding
        request ends here once its whole prompt is computed; full blocks of known tokens are cached,
        so even a request that ends on its first token leaves its prompt in the prefix cache.
        """
        sampling = [s.request for s in scheduled if s.samples]  # before progress moves
        caching = self.block_manager.enable_prefix_caching
        for s in scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            if request.pooling is not None:
                self._finish_pooled(s)
            elif caching:
                self.block_manager.cache_full_blocks(request)
        for request in sampling:
            request.num_pending_tokens += 1
        return sampling

    def apply_tokens(
        self, sampling: Sequence[Request], sampled_token_ids: Sequence[int]
    ) -> list[SampledToken | None]:
        """A committed step's tokens are known: append them, stop on stop tokens and lengths (blocks freed).

        One token per request of `commit`'s list, in order; the result is aligned with it. A request that
        ended after the step was launched (abort, or its previous token stopped it) drops its token: None.
        """
        assert len(sampling) == len(sampled_token_ids), "one sampled token per sampling request"
        sampled: list[SampledToken | None] = []
        finished = RequestStatus.FINISHED
        for request, token_id in zip(sampling, sampled_token_ids, strict=True):
            request.num_pending_tokens -= 1
            sampled.append(None if request.status is finished else self._append_token(request, token_id))
        return sampled

    def _finish_pooled(self, scheduled: ScheduledRequest) -> None:
        """An embedding request ends once its whole prompt is computed; its blocks are freed, none cached."""
        if scheduled.request.num_computed_tokens == scheduled.request.num_tokens:
            self.finish(scheduled.request, "stop")

    def _append_token(self, request: Request, token_id: int) -> SampledToken:
        request.token_ids.append(token_id)
        reason = self._stop_reason(request, token_id)
        if reason is not None:
            self.finish(request, reason)
        return SampledToken(request, token_id)

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        config = request.gen_config
        num_tokens = len(request.token_ids)
        num_output_tokens = num_tokens - request.num_prompt_tokens
        if num_output_tokens > config.min_new_tokens:
            if token_id in config.stop_token_ids or (
                not config.ignore_eos and token_id in self.eos_token_ids
            ):
                return "stop"
        # _ends_by_length(request, 0), inline: it runs for every request every step
        if num_output_tokens >= request.max_new_tokens or num_tokens >= self.session_len:
            return "length"
        return None

    def _ends_by_length(self, request: Request, num_more_tokens: int) -> bool:
        """Whether the request is at a length limit once num_more_tokens more are appended."""
        num_tokens = request.num_tokens + num_more_tokens
        return (
            num_tokens - request.num_prompt_tokens >= request.max_new_tokens or num_tokens >= self.session_len
        )

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request wherever it is and free its blocks (stop, length, stop string, abort).

        Calling it again on a finished request only replaces the reason (a stop string
        completed by the token that also reached the length limit reports "stop").
        """
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        if request.block_table:
            self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
