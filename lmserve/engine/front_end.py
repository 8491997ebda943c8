"""FrontEnd: the asyncio side of an engine (per-request streams, text, stop strings), whatever runs the core.

The engine core (scheduler, model runner, sampler) produces token ids; everything per stream happens here,
in the caller's event loop: validation, incremental detokenization and stop strings (TextStream), and
coalescing, so a client that falls behind gets the tokens waiting for it as one delta instead of one each.
Two transports carry requests in and tokens out: a loop thread in this process (AsyncEngine) and an
engine-core process over ZeroMQ (CoreClient). Both hand `CoreOutput`s to `_dispatch` from their own thread.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from lmserve.engine.detokenizer import TextStream
from lmserve.engine.limits import EngineLimits, validate_embedding_request, validate_request
from lmserve.engine.messages import CoreOutput, EngineStats
from lmserve.generation import GenerationConfig, RequestOutput, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[CoreOutput]


@dataclass
class _Merged:
    """The CoreOutputs a reader found waiting, as one."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    last: CoreOutput


class FrontEnd:
    """Streams of one engine: `generate()` yields RequestOutput deltas with text; subclasses move the tokens.

    Subclasses set tokenizer, limits and default_generation_config, and implement `_submit`,
    `_submit_embedding`, `_abort_in_core`,
    `is_alive`, `stats` and `shutdown`.
    """

    tokenizer: Any
    limits: EngineLimits
    default_generation_config: GenerationConfig

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}

    @property
    def session_len(self) -> int:
        return self.limits.session_len

    async def generate(
        self,
        prompt_token_ids: list[int],
        gen_config: GenerationConfig | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's output deltas; leaving early (break, close, cancel) aborts it.

        ValueError before the first yield for a request that can never run; RuntimeError for an engine failure.
        """
        gen_config = gen_config or self.default_generation_config
        validate_request(prompt_token_ids, gen_config, self.limits)
        request_id, stream = self._open_stream(request_id)
        text = TextStream(self.tokenizer.hf, prompt_token_ids, gen_config)
        ended_in_core = False
        try:
            self._submit(request_id, list(prompt_token_ids), gen_config)
            num_generated = 0
            finished = False
            while not finished:
                merged = await _next_outputs(stream.queue)
                ended_in_core = merged.last.finish_reason is not None
                out = _to_request_output(request_id, merged, text, num_generated)
                num_generated, finished = out.num_generated_tokens, out.finished
                yield out
        finally:
            if not ended_in_core:
                self._abort_in_core(request_id)
            self._streams.pop(request_id, None)

    async def embed(self, prompt_token_ids: list[int], request_id: str | None = None) -> list[float]:
        """The prompt's pooled, L2-normalized last hidden state; cancelling the caller aborts the request.

        ValueError for a prompt that can never be embedded; RuntimeError for an engine failure or an abort.
        """
        validate_embedding_request(prompt_token_ids, self.limits)
        request_id, stream = self._open_stream(request_id)
        out = None
        try:
            self._submit_embedding(request_id, list(prompt_token_ids))
            out = await stream.queue.get()
        finally:
            if out is None:
                self._abort_in_core(request_id)
            self._streams.pop(request_id, None)
        if out.embedding is None and out.bad_request:
            raise ValueError(out.error)
        if out.embedding is None:
            raise RuntimeError(out.error or f"the embedding request ended without one ({out.finish_reason})")
        return out.embedding

    def _open_stream(self, request_id: str | None) -> tuple[str, _Stream]:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if not self.is_alive():
            raise RuntimeError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        return request_id, stream

    def abort(self, request_id: str) -> None:
        """End a request now: its stream finishes with finish_reason 'abort' (unknown ids are ignored)."""
        self._abort_in_core(request_id)

    # -- to implement ------------------------------------------------------------------

    def _submit(self, request_id: str, prompt_token_ids: list[int], gen_config: GenerationConfig) -> None:
        raise NotImplementedError

    def _submit_embedding(self, request_id: str, prompt_token_ids: list[int]) -> None:
        raise NotImplementedError

    def _abort_in_core(self, request_id: str) -> None:
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    # -- for the transport's thread ------------------------------------------------------

    def _dispatch(self, outputs: list[CoreOutput]) -> None:
        """Hand outputs to their streams' event loops: one wake-up per loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[CoreOutput], CoreOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: its callers are gone
                for _, out in items:
                    self._streams.pop(out.request_id, None)

    def _fail_all(self, message: str) -> None:
        """End every open stream with an error (the engine died)."""
        self._dispatch([_error_output(request_id, message) for request_id in list(self._streams)])


async def _next_outputs(queue: asyncio.Queue[CoreOutput]) -> _Merged:
    """Wait for the next output, then take every other one already waiting (a reader that fell behind)."""
    first = await queue.get()
    if queue.empty() or first.finish_reason is not None:
        return _Merged(first.token_ids, first.logprobs, first)
    token_ids, logprobs, last = list(first.token_ids), _copy(first.logprobs), first
    while not queue.empty() and last.finish_reason is None:
        last = queue.get_nowait()
        token_ids += last.token_ids
        if logprobs is not None and last.logprobs is not None:
            logprobs += last.logprobs
    return _Merged(token_ids, logprobs, last)


def _copy(logprobs: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
    return None if logprobs is None else list(logprobs)


def _to_request_output(
    request_id: str, merged: _Merged, text: TextStream, num_generated: int
) -> RequestOutput:
    last = merged.last
    if last.error is not None:
        raise (ValueError if last.bad_request else RuntimeError)(last.error)
    delta = text.push(merged.token_ids, last.finish_reason)
    token_ids = merged.token_ids[: delta.num_tokens]
    logprobs = None if merged.logprobs is None else merged.logprobs[: delta.num_tokens]
    reason = delta.finish_reason
    return RequestOutput(
        request_id=request_id,
        text=delta.text,
        token_ids=token_ids,
        logprobs=logprobs,
        finished=reason is not None,
        finish_reason=reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_generated_tokens=num_generated + len(token_ids),
        num_cached_tokens=last.num_cached_tokens,
    )


def _error_output(request_id: str, message: str) -> CoreOutput:
    return CoreOutput(request_id, [], None, "error", 0, 0, message)


def _put_all(items: list[tuple[asyncio.Queue[CoreOutput], CoreOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
