"""api_server front ends: uvicorn over an engine, one in this process and, with --api-server-count N, N - 1 more
in processes of their own, all on one port (SO_REUSEPORT) and one engine-core process."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lmserve.config import EngineConfig, ServeConfig
from lmserve.engine.core import CoreAddresses

logger = logging.getLogger("lmserve.serve")

WATCH_S = 0.2


@dataclass(frozen=True)
class FrontEndSpec:
    """What a front-end process needs: the model's tokenizer source, the server options, the core's endpoints."""

    model: str | None
    chat_template: str | None
    serve_config: ServeConfig
    addresses: CoreAddresses
    client_index: int
    core_pid: int


def serve(
    engine: Any,
    serve_config: ServeConfig,
    sock: socket.socket | None = None,
    watched: list[Any] | None = None,
) -> int:
    """Run uvicorn over the engine until SIGINT/SIGTERM (exit code 0), or until the engine core or one of the
    `watched` front-end processes dies (1). With `proxy_url` set, join that proxy once listening, leave on stop."""
    import uvicorn

    from lmserve.serve.app import create_app

    config = serve_config
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, config),
            host=config.server_name,
            port=config.server_port,
            log_level=config.log_level.lower(),
        )
    )
    died: list[bool] = []

    def stop(failed: bool) -> None:  # from a watcher thread: stop serving; open streams already got errors
        died.append(failed)
        server.should_exit = True

    if hasattr(engine, "on_death"):
        engine.on_death.append(lambda: stop(True))
    watcher = _watch(watched or [], lambda: stop(True))
    leave_proxy = _join_proxy(server, config)
    try:
        with sigterm_exits_cleanly():
            server.run(sockets=[sock] if sock is not None else None)
    finally:
        watcher.set()
        leave_proxy()
        stop_all(watched or [])  # the other front ends first: they must not see the core go away
        engine.shutdown()
    return 1 if any(died) else 0


@contextlib.contextmanager
def sigterm_exits_cleanly() -> Iterator[None]:
    """uvicorn re-raises SIGTERM once it has shut down, which would end the process before the cleanup after
    it (leaving the proxy, stopping the core and the other front ends): make that SIGTERM a SystemExit(0)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: Any) -> None:
    sys.exit(0)


def _join_proxy(server: Any, config: ServeConfig) -> Callable[[], None]:
    """Register with `config.proxy_url` once uvicorn listens; returns what deregisters (if registered)."""
    from lmserve.serve.proxy import registration

    proxy_url = config.proxy_url
    if proxy_url is None:
        return lambda: None
    node_url = registration.advertised_url(config.server_name, config.server_port, proxy_url)
    joined: list[bool] = []

    def join() -> None:
        joined.append(
            registration.register(proxy_url, node_url, [config.model_name, *config.adapters], config.api_keys)
        )

    thread = registration.register_when_listening(lambda: server.started, lambda: server.should_exit, join)

    def leave() -> None:
        thread.join(timeout=registration.REGISTER_TIMEOUT_S)
        if any(joined):
            registration.deregister(proxy_url, node_url, config.api_keys)

    return leave


def serve_many(
    model: str | None,
    engine_config: EngineConfig,
    chat_template: str | None,
    serve_config: ServeConfig,
    count: int,
) -> int:
    """One engine core, `count` front ends on one port: this process runs front end 0 and watches the rest."""
    from lmserve.engine.core_client import CoreClient

    sock = listening_socket(serve_config.server_name, serve_config.server_port)  # a port in use fails first
    engine = CoreClient.start(model, engine_config, chat_template, serve_config.log_level, count)
    core = engine.core
    assert core is not None
    others: list[Any] = []
    try:
        context = multiprocessing.get_context("spawn")
        for index in range(1, count):
            # only this process registers with a --proxy-url: all front ends share one port, one node
            config = dataclasses.replace(serve_config, proxy_url=None)
            spec = FrontEndSpec(model, chat_template, config, core.addresses, index, core.pid)
            others.append(
                context.Process(target=run_front_end, args=(spec,), name=f"lmserve-api-server-{index}")
            )
            others[-1].start()
    except BaseException:
        stop_all(others)
        engine.shutdown()
        raise
    return serve(engine, serve_config, sock, watched=others)


def run_front_end(spec: FrontEndSpec) -> None:
    """Process entry point of front end 1..N-1: attach to the core, serve on the shared port."""
    from lmserve.engine.core_client import CoreClient, pid_alive
    from lmserve.models.loader import resolve_model
    from lmserve.models.tokenizer import load_tokenizer

    config = spec.serve_config
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer = load_tokenizer(resolve_model(spec.model), spec.chat_template)
    engine = CoreClient(spec.addresses, spec.client_index, tokenizer, lambda: pid_alive(spec.core_pid))
    sys.exit(serve(engine, config, listening_socket(config.server_name, config.server_port)))


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket several processes can bind at once; the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _watch(processes: list[Any], on_exit: Callable[[], None]) -> threading.Event:
    """A thread that calls on_exit once if any process ends before the returned event is set."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(WATCH_S):
            if any(not process.is_alive() for process in processes):
                logger.error("a front-end process exited; stopping the server")
                on_exit()
                return

    threading.Thread(target=loop, name="lmserve-front-end-watcher", daemon=True).start()
    return done


def stop_all(processes: list[Any]) -> None:
    """SIGTERM (uvicorn's graceful stop) to every front end still running, then wait; SIGKILL stragglers."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 30
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
