"""CoreClient: the AsyncEngine interface over an engine core in a process of its own (ZeroMQ + msgpack)."""

from __future__ import annotations

import contextlib
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
    EmbedRequest,
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


class CoreProcess:
    """The engine-core process and its endpoints; owned by the server's main process, which stops it."""

    def __init__(self, process: Any, addresses: CoreAddresses, workdir: str) -> None:
        self.process = process
        self.addresses = addresses
        self.workdir = workdir

    @classmethod
    def start(
        cls,
        model: str | None,
        config: EngineConfig,
        chat_template: str | None = None,
        log_level: str = "WARNING",
        num_front_ends: int = 1,
    ) -> CoreProcess:
        """Start the core loading the model (front ends then connect and wait for its ready message)."""
        workdir = tempfile.mkdtemp(prefix="lmserve-core-")
        outputs = tuple(f"ipc://{workdir}/output-{i}" for i in range(num_front_ends))
        addresses = CoreAddresses(f"ipc://{workdir}/input", outputs)
        spec = CoreSpec(model, config, chat_template, addresses, os.getpid(), log_level)
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(spec,), name="lmserve-engine-core"
        )
        process.start()
        return cls(process, addresses, workdir)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    def stop(self) -> None:
        _stop_process(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


class CoreClient(FrontEnd):
    """One front end of an engine-core process: streams its tokens into per-request asyncio queues.

    A receiver thread reads the core's outputs (zmq releases the GIL while it waits) and hands them to the
    streams' event loops; tokenization, text and SSE stay in those loops. If the core dies, every open
    stream ends with an error at once, `is_alive()` turns false and the `on_death` callbacks run.
    Front end `client_index` reads the core's outputs[client_index]; the one that owns the CoreProcess
    stops it on shutdown, the others (`--api-server-count`) only let go of it.
    """

    def __init__(
        self,
        addresses: CoreAddresses,
        client_index: int,
        tokenizer: Any,
        core_alive: Callable[[], bool],
        owner: CoreProcess | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.on_death: list[Callable[[], None]] = []
        self._client_index = client_index
        self._core_alive = core_alive
        self._owner = owner
        self._context = zmq.Context()
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.RCVHWM, 0)
        self._outputs.bind(addresses.outputs[client_index])
        try:
            ready = _wait_ready(self._outputs, core_alive)
        except BaseException:
            self._context.destroy(linger=0)
            raise
        assert ready.limits and ready.default_generation_config and ready.stats
        self.limits = ready.limits
        self.default_generation_config = ready.default_generation_config
        self._stats = ready.stats
        self._inputs = self._context.socket(zmq.PUSH)
        self._inputs.setsockopt(zmq.SNDHWM, 0)
        self._inputs.connect(addresses.input)
        self._send_lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()
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
        num_front_ends: int = 1,
        while_loading: Callable[[], None] | None = None,
    ) -> CoreClient:
        """Start a core, be its front end 0 (its owner) and wait until it is ready; the core serves
        `num_front_ends` in all, the others attach to `self.core.addresses` as front ends 1, 2, ...

        The core is spawned first, so its imports (torch, transformers) run beside this process's own;
        the tokenizer and then `while_loading` (the server imports its app) run while the core loads.
        ValueError / FileNotFoundError for a model the core cannot load (with the core's message).
        """
        from lmserve.models.source import resolve_model  # no torch: the core starts before our imports

        source = resolve_model(model)  # a bad path fails here, before a process starts
        core = CoreProcess.start(model, config or EngineConfig(), chat_template, log_level, num_front_ends)
        try:

            def load() -> Any:
                from lmserve.models.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(source, chat_template)
                if while_loading is not None:
                    while_loading()
                return tokenizer

            tokenizer = run_niced(load)
            return cls(core.addresses, 0, tokenizer, core.is_alive, owner=core)
        except BaseException:
            core.stop()
            raise

    # -- FrontEnd ------------------------------------------------------------------------

    def _submit(self, request_id: str, prompt_token_ids: list[int], gen_config: GenerationConfig) -> None:
        self._send(AddRequest(request_id, prompt_token_ids, gen_config, self._client_index))

    def _submit_embedding(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self._send(EmbedRequest(request_id, prompt_token_ids, self._client_index))

    def _abort_in_core(self, request_id: str) -> None:
        if not self._dead:
            self._send(AbortRequests([request_id]))

    @property
    def core(self) -> CoreProcess | None:
        """The core process this front end owns (None for front ends that only attach to one)."""
        return self._owner

    def is_alive(self) -> bool:
        return not self._dead and self._core_alive()

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        """Let go of the core (and stop it, politely then by force, if this front end owns it); idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._owner is not None:
            if self._owner.is_alive():
                self._send(Shutdown())
            self._owner.stop()
        self._receiver.join(timeout=5)
        self._context.destroy(linger=0)

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
            elif not self._core_alive():
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
        message = "the engine core process died"
        logger.error("%s; failing %d open requests", message, len(self._streams))
        self._fail_all(message)
        for callback in self.on_death:
            callback()


FRONT_END_NICE = 10
"""How much lower than the engine core the front end's start-up work runs (see run_niced)."""


def run_niced(work: Callable[[], Any]) -> Any:
    """`work()` in a thread of lower CPU priority (Linux niceness is per thread), its result or its error.

    The front end's start-up (tokenizer, web app imports) only has to end before the core is ready, while the
    core's imports and weight conversion are the start's critical path: on a 2-core box with the compiler and
    the weight-cache writer also running, the core gets the CPU first. Where priorities cannot be set, the
    work runs as it is.
    """
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FRONT_END_NICE)
        try:
            results.append(work())
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run, name="lmserve-front-end-start")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _wait_ready(outputs: zmq.Socket, core_alive: Callable[[], bool]) -> CoreReady:
    """The core's ready message; raises with its error, or if it dies before saying anything."""
    decoder = ready_decoder()
    while not outputs.poll(POLL_MS):
        if not core_alive():
            raise EngineCoreDied("the engine core process exited while loading the model")
    ready = decoder.decode(outputs.recv())
    if ready.error is not None:
        raise ValueError(ready.error)
    return ready


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a sibling cannot reap it, so is_alive won't do)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _stop_process(process: Any) -> None:
    process.join(timeout=SHUTDOWN_GRACE_S)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()
