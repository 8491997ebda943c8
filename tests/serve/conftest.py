"""Fixtures: real uvicorn servers on free loopback ports, serving the embedded SmolLM2.

The shared engine runs its core in a process of its own (CoreClient), as `serve api_server` does on CUDA;
the browser tests (tests/e2e) serve through the in-process AsyncEngine, so both transports are covered.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from lmserve.config import EngineConfig, ServeConfig
from lmserve.serve.app import create_app

MODEL_NAME = "smollm2"
API_KEY = "sk-test-key"


@dataclass
class RunningServer:
    base_url: str
    engine: Any
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range: a port the OS hands out itself (bind to 0, as this
    used to) can be handed again to a socket the OS numbers (a client's, gloo's pair connections of a tp=2 server
    starting meanwhile) before the server binds it; CI once failed that way ("address already in use")."""
    low = ephemeral_port_low()
    for port in random.sample(range(max(1024, low - 16384), low), 256):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # nothing free below the range: let the OS choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ephemeral_port_low() -> int:
    """The lowest port of the kernel's ephemeral range (Linux's default 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def start_server(engine: Any, config: ServeConfig) -> RunningServer:
    """uvicorn in a background thread (its own event loop); returns once /health answers."""
    port = free_port()
    app = create_app(engine, config)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code in (200, 503):
                return RunningServer(base_url, engine, server, thread)
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("test server did not start")


def load_engine(**engine_options: Any) -> Any:
    from lmserve.engine.core_client import CoreClient

    return CoreClient.start(None, EngineConfig(dtype="float32", **engine_options))


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    engine = load_engine()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def server(engine: Any) -> Iterator[RunningServer]:
    running = start_server(engine, ServeConfig(model_name=MODEL_NAME))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def keyed_server(engine: Any) -> Iterator[RunningServer]:
    """A second app over the same engine, with an API key and a narrow CORS origin list."""
    config = ServeConfig(
        model_name=MODEL_NAME, api_keys=(API_KEY,), allow_origins=("http://allowed.example",)
    )
    running = start_server(engine, config)
    yield running
    running.stop()


@pytest.fixture()
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield http


def children_of(pid: int) -> list[int]:
    """Live child processes of pid (from /proc; zombies count as gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def wait_until(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
