"""AsyncEngine: runs LLMEngine.step() on a loop thread and streams each request's outputs to asyncio."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from lmserve.config import EngineConfig
from lmserve.engine.engine import EngineStats, LLMEngine
from lmserve.generation import GenerationConfig, RequestOutput

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
STALL_LIMIT_S = 120.0
"""A step running longer than this makes is_alive() (and /health) report the engine as stuck."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


class AsyncEngine:
    """The engine's asyncio face. All engine state is touched by the loop thread only.

    Callers hand commands (add, abort) to the thread through a queue; outputs come back
    through each request's asyncio.Queue via `loop.call_soon_threadsafe`.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.session_len = engine.session_len
        self.default_generation_config = engine.default_generation_config
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stats = engine.stats()
        self._stop = threading.Event()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls, model: str | None = None, config: EngineConfig | None = None, chat_template: str | None = None
    ) -> AsyncEngine:
        return cls(LLMEngine.from_pretrained(model, config, chat_template))

    # -- public API (any thread / event loop) -------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        gen_config: GenerationConfig | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's output deltas; leaving early (break, close, cancel) aborts it."""
        gen_config = gen_config or self.default_generation_config
        self.engine.validate_request(prompt_token_ids, gen_config)  # raises ValueError before anything starts
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._commands.put(lambda: self._add(prompt_token_ids, gen_config, request_id))
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                finished = out.finished
                if out.error is not None and out.finish_reason == "error":
                    raise RuntimeError(out.error)
                yield out
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self._abort(request_id))

    def is_alive(self) -> bool:
        """True while the loop thread runs and no step has been stuck for STALL_LIMIT_S."""
        busy = self._busy_since
        return self._thread.is_alive() and (busy is None or time.monotonic() - busy < STALL_LIMIT_S)

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    # -- the loop thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            self._busy_since = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as error:  # a failing step must not kill the server: fail its requests
                logger.exception("engine step failed")
                outputs = self.engine.fail_all(f"engine error: {error}")
            finally:
                self._busy_since = None
            self._stats = self.engine.stats()
            self._deliver_all(outputs)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=HEARTBEAT_S) if block else self._commands.get_nowait()
            while True:
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        self._stats = self.engine.stats()

    def _add(self, prompt_token_ids: list[int], gen_config: GenerationConfig, request_id: str) -> None:
        if request_id not in self._streams:
            return  # the caller already left
        try:
            self.engine.add_request(prompt_token_ids, gen_config, request_id)
        except Exception as error:
            self._deliver(RequestOutput(request_id, finished=True, finish_reason="error", error=str(error)))

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver(out)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their event loops: one wake-up per loop, not one per request."""
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]
        ] = {}
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

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
            except RuntimeError:  # the caller's event loop is closed
                self._streams.pop(out.request_id, None)

    def __getattr__(self, name: str) -> Any:
        # fall through to the sync engine for read-only facts (model_config, resolved, ...)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


def _put_all(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for queue_, out in items:
        queue_.put_nowait(out)
