"""AsyncEngine: the engine core on a loop thread of this process, behind the same FrontEnd as CoreClient."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.engine.front_end import FrontEnd
from lmserve.engine.messages import EngineStats, to_core_output
from lmserve.generation import GenerationConfig, RequestOutput, rejected

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
STALL_LIMIT_S = 120.0
"""A step running longer than this makes is_alive() (and /health) report the engine as stuck."""


class AsyncEngine(FrontEnd):
    """The engine's asyncio face in one process. All engine state is touched by the loop thread only.

    Callers hand commands (add, abort) to the thread through a queue; token outputs come back to each
    request's stream (FrontEnd), where text and stop strings are made in the caller's event loop.
    It takes the `LLMEngine` over: from then on only the loop thread touches it, and it makes no text.
    """

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        engine.detokenize = False  # the engine is ours from now on, and the front end makes the text
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.limits = engine.limits
        self.default_generation_config = engine.default_generation_config
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stats = engine.stats()
        self._stop = threading.Event()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls, model: str | None = None, config: EngineConfig | None = None, chat_template: str | None = None
    ) -> AsyncEngine:
        return cls(LLMEngine.from_pretrained(model, config, chat_template, detokenize=False))

    # -- FrontEnd ------------------------------------------------------------------------

    def _submit(self, request_id: str, prompt_token_ids: list[int], gen_config: GenerationConfig) -> None:
        add = self.engine.add_request
        self._commands.put(
            lambda: self._add(request_id, lambda: add(prompt_token_ids, gen_config, request_id))
        )

    def _submit_embedding(self, request_id: str, prompt_token_ids: list[int]) -> None:
        add = self.engine.add_embedding_request
        self._commands.put(lambda: self._add(request_id, lambda: add(prompt_token_ids, request_id)))

    def _abort_in_core(self, request_id: str) -> None:
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
                outputs = self.engine.fail_all(f"engine error: {type(error).__name__}")
            finally:
                self._busy_since = None
            self._stats = self.engine.stats()
            self._deliver(outputs)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=HEARTBEAT_S) if block else self._commands.get_nowait()
            while True:
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        self._stats = self.engine.stats()

    def _add(self, request_id: str, add: Callable[[], object]) -> None:
        if request_id not in self._streams:
            return  # the caller already left
        try:
            add()
        except ValueError as error:  # the request's fault (e.g. raced a limit): a 400
            self._deliver([rejected(request_id, str(error))])
        except Exception as error:
            self._deliver([RequestOutput(request_id, finished=True, finish_reason="error", error=str(error))])

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        self._dispatch([to_core_output(out) for out in outputs])

    def __getattr__(self, name: str) -> Any:
        # fall through to the sync engine for read-only facts (model_config, resolved, ...)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)
