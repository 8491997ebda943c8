"""Running engine requests for one HTTP request: n choices merged, disconnect watching, abort registry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from lmserve.engine.client import EngineClient
from lmserve.generation import GenerationConfig, RequestOutput
from lmserve.serve.errors import APIError
from lmserve.serve.metrics import RequestTimer, ServerMetrics

T = TypeVar("T")


@dataclass
class Submission:
    """One engine request: which choice it feeds, its prompt and its sampling config."""

    index: int
    prompt_token_ids: list[int]
    gen_config: GenerationConfig


@dataclass
class InFlight:
    """API ids (chatcmpl-..., cmpl-...) → engine request ids, for /abort_request."""

    engine_ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, api_id: str, engine_ids: list[str]) -> None:
        self.engine_ids[api_id] = engine_ids

    def remove(self, api_id: str) -> None:
        self.engine_ids.pop(api_id, None)


_DONE = object()


async def _pump(
    engine: EngineClient,
    sub: Submission,
    engine_id: str,
    queue: asyncio.Queue[Any],
    metrics: ServerMetrics | None,
) -> None:
    """Feed one engine request's outputs into the shared queue; an exception goes into the queue too."""
    timer = RequestTimer(metrics)
    finished = False
    try:
        stream = engine.generate(sub.prompt_token_ids, sub.gen_config, request_id=engine_id)
        async with contextlib.aclosing(stream):
            async for out in stream:
                timer.on_output(len(out.token_ids))
                if out.finished:
                    finished = True
                    timer.on_finish(out.num_prompt_tokens, out.num_generated_tokens, out.finish_reason)
                await queue.put((sub.index, out))
    except asyncio.CancelledError:
        raise
    except ValueError as error:  # the engine's verdict on a bad request (e.g. prompt too long)
        await queue.put(APIError(400, str(error)))
    except Exception as error:
        await queue.put(error)
    finally:
        if not finished:
            engine.abort(engine_id)
        queue.put_nowait((sub.index, _DONE))


async def run_choices(
    engine: EngineClient,
    api_id: str,
    submissions: list[Submission],
    in_flight: InFlight,
    metrics: ServerMetrics | None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit every choice to the engine and yield (choice index, delta) as they come.

    Closing this iterator (client gone, error) cancels every engine request, which frees its KV blocks.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()
    engine_ids = [f"{api_id}-{sub.index}" for sub in submissions]
    in_flight.add(api_id, engine_ids)
    tasks = [
        asyncio.create_task(_pump(engine, sub, engine_id, queue, metrics))
        for sub, engine_id in zip(submissions, engine_ids, strict=True)
    ]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            index, out = item
            if out is _DONE:
                remaining -= 1
                continue
            yield index, out
    finally:
        in_flight.remove(api_id)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone away (the body is already read, so only disconnect remains)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (so the engine frees its blocks)."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work_task.done():
            work_task.cancel()
            raise APIError(499, "client disconnected")
        return work_task.result()
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()


async def stop_on_disconnect(request: Request, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass SSE chunks through until the client disconnects, then close the source (aborting requests).

    Waits on the next chunk and on the disconnect together, so a client that leaves while
    its request is still queued or prefilling is noticed at once, not at the next token.
    """
    watcher = asyncio.create_task(wait_for_disconnect(request))
    iterator = chunks.__aiter__()
    next_chunk: asyncio.Future[str] | None = None
    try:
        while True:
            next_chunk = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait({next_chunk, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not next_chunk.done():
                return
            try:
                chunk = next_chunk.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        watcher.cancel()
        # Starlette may be cancelling us (anyio scopes re-cancel every await here), so the
        # source is closed by a detached task: cancel the pending step, then aclose().
        cleanup = asyncio.get_running_loop().create_task(_close(next_chunk, iterator))
        _CLEANUPS.add(cleanup)
        cleanup.add_done_callback(_CLEANUPS.discard)


_CLEANUPS: set[asyncio.Task[None]] = set()


async def _close(pending: asyncio.Future[str] | None, iterator: AsyncIterator[str]) -> None:
    if pending is not None and not pending.done():
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    await iterator.aclose()  # type: ignore[attr-defined]
