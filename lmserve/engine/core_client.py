"""CoreClient: the AsyncEngine interface over an engine core in a process of its own (ZeroMQ + msgpack)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from lmserve.config import EngineConfig
from lmserve.engine.core import CoreAddresses, CoreSpec, run_engine_core
from lmserve.engine.front_end import FrontEnd
from lmserve.engine.messages import (
    AbortRequests,
    AddRequest,
    CoreReady,
    EngineStats,
    Shutdown,
    outputs_decoder,
    ready_decoder,
)
from lmserve.generation import GenerationConfig

logger = logging.getLogger(__name__)

POLL_MS = 50
"""How often the receiver looks at the core process when no output arrives (death is noticed this fast)."""
SHUTDOWN_GRACE_S = 10.0


class EngineCoreDied(RuntimeError):
    pass


class CoreClient(FrontEnd):
    """Starts the engine-core process, streams its tokens into per-request asyncio queues.

    A receiver thread reads the core's outputs (zmq releases the GIL while it waits) and hands them to the
    streams' event loops; tokenization, text and SSE stay in those loops. If the core dies, every open
    stream ends with an error at once, `is_alive()` turns false and the `on_death` callbacks run.
    """

    def __init__(
        self,
        process: Any,
        context: zmq.Context,
        outputs: zmq.Socket,
        addresses: CoreAddresses,
        ready: CoreReady,
        tokenizer: Any,
        workdir: str,
    ) -> None:
        super().__init__()
        assert ready.limits and ready.default_generation_config and ready.stats
        self.tokenizer = tokenizer
        self.limits = ready.limits
        self.default_generation_config = ready.default_generation_config
        self.on_death: list[Callable[[], None]] = []
        self._process = process
        self._context = context
        self._outputs = outputs
        self._inputs = context.socket(zmq.PUSH)
        self._inputs.setsockopt(zmq.SNDHWM, 0)
        self._inputs.connect(addresses.input)
        self._send_lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._stats = ready.stats
        self._workdir = workdir
        self._closing = threading.Event()
        self._dead = False
        self._receiver = threading.Thread(target=self._receive, name="lmserve-core-receiver", daemon=True)
        self._receiver.start()

    @classmethod
    def start(
        cls,
        model: str | None = None,
        config: EngineConfig | None = None,
        chat_template: str | None = None,
        log_level: str = "WARNING",
    ) -> CoreClient:
        """Resolve the model and load its tokenizer here, then start the core and wait until it is ready.

        ValueError / FileNotFoundError for a model the core cannot load (with the core's message).
        """
        from lmserve.models.loader import resolve_model
        from lmserve.models.tokenizer import load_tokenizer

        source = resolve_model(model)  # a bad path fails here, before a process starts
        workdir = tempfile.mkdtemp(prefix="lmserve-core-")
        addresses = CoreAddresses(f"ipc://{workdir}/input", (f"ipc://{workdir}/output-0",))
        context = zmq.Context()
        outputs = context.socket(zmq.PULL)
        outputs.setsockopt(zmq.RCVHWM, 0)
        outputs.bind(addresses.outputs[0])
        spec = CoreSpec(model, config or EngineConfig(), chat_template, addresses, os.getpid(), log_level)
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(spec,), name="lmserve-engine-core"
        )
        process.start()
        try:
            tokenizer = load_tokenizer(source, chat_template)  # while the core loads the weights
            ready = _wait_ready(outputs, process)
        except BaseException:
            _stop_process(process)
            context.destroy(linger=0)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(process, context, outputs, addresses, ready, tokenizer, workdir)

    # -- FrontEnd ------------------------------------------------------------------------

    def _submit(self, request_id: str, prompt_token_ids: list[int], gen_config: GenerationConfig) -> None:
        self._send(AddRequest(request_id, prompt_token_ids, gen_config, 0))

    def _abort_in_core(self, request_id: str) -> None:
        if not self._dead:
            self._send(AbortRequests([request_id]))

    def is_alive(self) -> bool:
        return not self._dead and self._process.is_alive()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def core_pid(self) -> int:
        return int(self._process.pid)

    def shutdown(self) -> None:
        """Stop the core (politely, then by force) and the receiver; safe to call twice."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._process.is_alive():
            try:
                self._send(Shutdown())
            except zmq.ZMQError:
                pass
        _stop_process(self._process)
        self._receiver.join(timeout=5)
        self._context.destroy(linger=0)
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- the receiver thread -------------------------------------------------------------

    def _send(self, message: Any) -> None:
        payload = self._encoder.encode(message)
        with self._send_lock:  # zmq sockets are not thread-safe; streams live on several event loops
            self._inputs.send(payload)

    def _receive(self) -> None:
        decoder = outputs_decoder()
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        while not self._closing.is_set():
            if poller.poll(POLL_MS):
                self._drain(decoder)
            elif not self._process.is_alive():
                self._core_died()
                return

    def _drain(self, decoder: msgspec.msgpack.Decoder[Any]) -> None:
        while True:
            try:
                message = decoder.decode(self._outputs.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            self._stats = message.stats
            if message.outputs:
                self._dispatch(message.outputs)

    def _core_died(self) -> None:
        if self._closing.is_set():
            return
        self._dead = True
        message = f"the engine core process died (exit code {self._process.exitcode})"
        logger.error("%s; failing %d open requests", message, len(self._streams))
        self._fail_all(message)
        for callback in self.on_death:
            callback()


def _wait_ready(outputs: zmq.Socket, process: Any) -> CoreReady:
    """The core's ready message; raises with its error, or if it dies before saying anything."""
    decoder = ready_decoder()
    while not outputs.poll(POLL_MS):
        if not process.is_alive():
            raise EngineCoreDied(f"the engine core process exited (code {process.exitcode}) while loading")
    ready = decoder.decode(outputs.recv())
    if ready.error is not None:
        raise ValueError(ready.error)
    return ready


def _stop_process(process: Any) -> None:
    process.join(timeout=SHUTDOWN_GRACE_S)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()
