"""Running engine requests for one HTTP request: n choices merged, disconnect watching, abort registry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
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

    def abort(self, engine: EngineClient, api_id: str) -> list[str]:
        """Abort the engine requests of one API request; returns their ids."""
        engine_ids = self.engine_ids.get(api_id, [])
        for engine_id in engine_ids:
            engine.abort(engine_id)
        return list(engine_ids)


_DONE = object()


async def _outputs(
    engine: EngineClient, sub: Submission, engine_id: str, metrics: ServerMetrics | None
) -> AsyncGenerator[RequestOutput, None]:
    """One engine request's outputs, timed for the metrics; the engine's ValueError becomes a 400."""
    timer = RequestTimer(metrics)
    try:
        stream = engine.generate(sub.prompt_token_ids, sub.gen_config, request_id=engine_id)
        async with contextlib.aclosing(stream):  # leaving early aborts the engine request
            async for out in stream:
                timer.on_output(len(out.token_ids))
                if out.finished:
                    timer.on_finish(out.num_prompt_tokens, out.num_generated_tokens, out.finish_reason)
                yield out
    except ValueError as error:  # the engine's verdict on a bad request (e.g. prompt too long)
        raise APIError(400, str(error)) from error


async def _pump(
    engine: EngineClient,
    sub: Submission,
    engine_id: str,
    queue: asyncio.Queue[Any],
    metrics: ServerMetrics | None,
) -> None:
    """Feed one engine request's outputs into the shared queue; an exception goes into the queue too."""
    try:
        async with contextlib.aclosing(_outputs(engine, sub, engine_id, metrics)) as outputs:
            async for out in outputs:
                await queue.put((sub.index, out))
    except asyncio.CancelledError:
        raise
    except Exception as error:
        await queue.put(error)
    finally:
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
    One choice (nearly every request) is read directly; several are merged through a queue.
    """
    engine_ids = [f"{api_id}-{sub.index}" for sub in submissions]
    in_flight.add(api_id, engine_ids)
    try:
        if len(submissions) == 1:
            async with contextlib.aclosing(
                _outputs(engine, submissions[0], engine_ids[0], metrics)
            ) as outputs:
                async for out in outputs:
                    yield submissions[0].index, out
        else:
            async for item in _merged(engine, submissions, engine_ids, metrics):
                yield item
    finally:
        in_flight.remove(api_id)


async def _merged(
    engine: EngineClient,
    submissions: list[Submission],
    engine_ids: list[str],
    metrics: ServerMetrics | None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue[Any] = asyncio.Queue()
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
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _after_watch(watcher: asyncio.Task[None], on_disconnect: Callable[[], None]) -> None:
    if not watcher.cancelled() and watcher.exception() is None:
        on_disconnect()


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


async def stop_on_disconnect(
    request: Request, chunks: AsyncIterator[str], on_disconnect: Callable[[], None]
) -> AsyncIterator[str]:
    """Pass SSE chunks through; when the client disconnects, call on_disconnect (which aborts the requests).

    One watcher task per stream, not a future per chunk (that cost ~15 % of the server's time at 256
    streams): a client that leaves while its request is queued or prefilling is still noticed at once, and
    the aborted requests end their streams through the engine as any abort does.
    """
    watcher = asyncio.create_task(wait_for_disconnect(request))
    watcher.add_done_callback(lambda task: _after_watch(task, on_disconnect))
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        watcher.cancel()
