"""The engine-core process: scheduler, model runner and sampler in a loop of their own, fed over ZeroMQ.

Front ends PUSH `CoreRequest`s (add, abort, shutdown) to the core's one input socket; the core PUSHes each
front end its `CoreOutputs` (token deltas + stats) on that front end's own socket. The loop never waits on
HTTP work: it drains whatever requests arrived, runs a step, sends the step's outputs, and repeats. It
leaves when told to, or when its parent process is gone (no orphans after a kill -9 of the server).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from lmserve.config import EngineConfig
from lmserve.engine.messages import (
    AbortRequests,
    AddRequest,
    CoreOutput,
    CoreOutputs,
    CoreReady,
    CoreRequest,
    EmbedRequest,
    Shutdown,
    request_decoder,
    to_core_output,
)
from lmserve.generation import RequestOutput, rejected

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
"""Idle cores send their stats this often, so front ends see a live core and fresh gauges."""


@dataclass(frozen=True)
class CoreAddresses:
    """ZeroMQ endpoints: the core binds `input`; front end i binds `outputs[i]`."""

    input: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class CoreSpec:
    """What the core process builds its engine from (plain, picklable configuration; no user data)."""

    model: str | None
    config: EngineConfig
    chat_template: str | None
    addresses: CoreAddresses
    parent_pid: int
    log_level: str = "WARNING"


USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)
"""Load failures that name what is wrong with the model or the flags (the errors the CLI prints in one line)."""


def run_engine_core(spec: CoreSpec) -> None:
    """Process entry point: load the model, say ready (or why not), then serve requests until shut down."""
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front end stops us
    context = zmq.Context()
    outputs = [_connect(context, address) for address in spec.addresses.outputs]
    encoder = msgspec.msgpack.Encoder()
    try:
        engine = _load_engine(spec)
    except Exception as error:  # the front end reports it
        if isinstance(error, USER_ERRORS):  # a bad model or flag: the CLI's one error line says it all
            message = str(error)
        else:  # unexpected: a traceback here helps whoever reads the log
            logger.exception("engine core failed to load the model")
            message = f"{type(error).__name__}: {error}"
        _send_all(outputs, encoder.encode(CoreReady(message)))
        return
    inputs = context.socket(zmq.PULL)
    inputs.bind(spec.addresses.input)
    ready = CoreReady(None, engine.limits, engine.default_generation_config, engine.stats())
    _send_all(outputs, encoder.encode(ready))
    # the model, tokenizer and cache live as long as this process: later collections need not walk them
    gc.collect()
    gc.freeze()
    try:
        CoreLoop(engine, inputs, outputs, spec.parent_pid).run()
    finally:
        context.destroy(linger=0)
        engine.shutdown()  # tp workers leave with the core


def _load_engine(spec: CoreSpec) -> Any:
    from lmserve.kernels import cpu_build

    cpu_build.start_building(spec.config.device)  # before torch's import: `cc` runs on another core meanwhile
    from lmserve.engine.engine import LLMEngine

    return LLMEngine.from_pretrained(spec.model, spec.config, spec.chat_template, detokenize=False)


def _connect(context: zmq.Context, address: str) -> zmq.Socket:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs: a front end always drains them
    socket.connect(address)
    return socket


def _send_all(sockets: list[zmq.Socket], payload: bytes) -> None:
    for socket in sockets:
        socket.send(payload)


class CoreLoop:
    """Drain requests, step, send outputs; one iteration per engine step."""

    def __init__(self, engine: Any, inputs: zmq.Socket, outputs: list[zmq.Socket], parent_pid: int) -> None:
        self.engine = engine
        self.inputs = inputs
        self.outputs = outputs
        self.parent_pid = parent_pid
        self.client_of: dict[str, int] = {}
        """request id -> index of the front end that sent it."""
        self.decoder = request_decoder()
        self.encoder = msgspec.msgpack.Encoder()
        self.poller = zmq.Poller()
        self.poller.register(inputs, zmq.POLLIN)
        self.last_sent = time.monotonic()

    def run(self) -> None:
        while os.getppid() == self.parent_pid:
            busy = self.engine.has_unfinished()
            if not self._handle_requests(wait_ms=0 if busy else int(HEARTBEAT_S * 1000)):
                return
            outputs = self._step() if self.engine.has_unfinished() else []
            self._send(outputs, heartbeat=time.monotonic() - self.last_sent >= HEARTBEAT_S)

    def _handle_requests(self, wait_ms: int) -> bool:
        """Apply every request waiting (after up to wait_ms for the first); False on shutdown."""
        if not self.poller.poll(wait_ms):
            return True
        outputs: list[RequestOutput] = []
        while True:
            try:
                message = self.decoder.decode(self.inputs.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if isinstance(message, Shutdown):
                return False
            outputs += self._apply(message)
        self._send(outputs)
        return True

    def _apply(self, message: CoreRequest) -> list[RequestOutput]:
        if isinstance(message, (AddRequest, EmbedRequest)):
            return self._add(message)
        assert isinstance(message, AbortRequests)
        aborted = [self.engine.abort(request_id) for request_id in message.request_ids]
        return [out for out in aborted if out is not None]

    def _add(self, message: AddRequest | EmbedRequest) -> list[RequestOutput]:
        self.client_of[message.request_id] = message.client_index
        try:
            if isinstance(message, EmbedRequest):
                self.engine.add_embedding_request(message.prompt_token_ids, message.request_id)
            else:
                self.engine.add_request(message.prompt_token_ids, message.gen_config, message.request_id)
        except ValueError as error:  # front ends validate first; this is a request that raced a limit
            return [rejected(message.request_id, str(error))]
        return []

    def _step(self) -> list[RequestOutput]:
        try:
            return list(self.engine.step())
        except Exception as error:  # a failing step must not kill the core: fail its requests
            logger.exception("engine step failed")
            return list(self.engine.fail_all(f"engine error: {type(error).__name__}"))

    def _send(self, outputs: list[RequestOutput], heartbeat: bool = False) -> None:
        """One message to each front end with outputs (to every front end on a heartbeat), stats included."""
        if not outputs and not heartbeat:
            return
        by_client: list[list[CoreOutput]] = [[] for _ in self.outputs]
        for out in outputs:
            client = self.client_of.get(out.request_id, 0)
            if out.finished:
                self.client_of.pop(out.request_id, None)
            by_client[client].append(to_core_output(out))
        stats = self.engine.stats()
        for socket, client_outputs in zip(self.outputs, by_client, strict=True):
            if client_outputs or heartbeat:
                socket.send(self.encoder.encode(CoreOutputs(client_outputs, stats)))
        self.last_sent = time.monotonic()
