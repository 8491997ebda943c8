"""The engine core in its own process: faults (kill -9, Ctrl-C), clients that leave, no leaked KV blocks."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import MODEL_NAME, RunningServer, children_of, free_port, wait_until

START_TIMEOUT_S = 240
EXIT_TIMEOUT_S = 60


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def core_pid_of(server_pid: int) -> int:
    for pid in children_of(server_pid):
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no engine-core child under {server_pid}")


def start_cli_server(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """`lmserve serve api_server` as a user starts it (engine core in its own process), in its own group."""
    port = free_port()
    command = [sys.executable, "-m", "lmserve.cli.main", "serve", "api_server", "--dtype", "float32"]
    command += ["--server-name", "127.0.0.1", "--server-port", str(port), *extra]
    # a terminal's default Ctrl-C: a test run started in the background (`cmd &`) ignores SIGINT, and the server
    # would inherit that
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    base_url = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: _healthy(base_url), START_TIMEOUT_S):
        stop_group(process)
        raise AssertionError("server did not start")
    return process, base_url


def stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture()
def cli_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    process, base_url = start_cli_server()
    try:
        yield process, base_url
    finally:
        stop_group(process)


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _stream_lines(base_url: str, first_line: list[str]) -> list[str]:
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "stream": True}
    body |= {"max_tokens": 4000, "ignore_eos": True}
    lines: list[str] = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
                first_line.append(line)
    return lines


def test_killed_core_fails_open_streams_turns_health_503_and_exits_nonzero(
    cli_server: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, base_url = cli_server
    core = core_pid_of(process.pid)
    seen: list[str] = []
    loop = asyncio.new_event_loop()
    stream = loop.run_in_executor(None, _stream_lines, base_url, seen)
    assert wait_until(lambda: len(seen) >= 3, 60), "the stream never started"
    os.kill(core, signal.SIGKILL)
    lines = loop.run_until_complete(asyncio.wait_for(stream, 30))
    loop.close()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "internal_server_error" and "request id" in error["message"]
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 1
    assert not children_of(process.pid)


def test_ctrl_c_stops_server_and_core_leaving_no_orphans(
    cli_server: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, base_url = cli_server
    core = core_pid_of(process.pid)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group gets it
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 128 + signal.SIGINT  # uvicorn re-raises it once shut down
    assert wait_until(lambda: not is_running(core), 10), "the engine core outlived the server"
    assert process.stdout is not None
    assert b"Traceback" not in process.stdout.read()


def test_clients_leaving_at_random_points_free_every_block(server: RunningServer) -> None:
    engine = server.engine
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count from one to forty."}]}
    body |= {"temperature": 0, "max_tokens": 48}
    before = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120).json()
    total = engine.stats().num_total_blocks

    async def leave_after(client: httpx.AsyncClient, num_events: int) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
            async for line in response.aiter_lines():
                num_events -= bool(line)
                if num_events <= 0:
                    return  # closing the response mid-stream: the client is gone

    async def crowd() -> None:
        rng = random.Random(7)
        limits = httpx.Limits(max_connections=64)
        # 200 streams share 64 connections: waiting for one is the test's queue, not a failure (a loaded
        # machine made the pool wait pass 120 s); the reads keep their timeout
        timeout = httpx.Timeout(120, pool=None)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(leave_after(client, rng.randint(0, 30)) for _ in range(200)))

    asyncio.run(crowd())
    assert wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0, 60)
    assert wait_until(lambda: engine.stats().num_free_blocks == total, 10)
    after = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120).json()
    assert after["choices"][0]["message"] == before["choices"][0]["message"]
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert "lmserve_num_requests_running 0.0" in metrics


def test_two_front_ends_share_one_core_and_stop_together() -> None:
    process, base_url = start_cli_server("--api-server-count", "2")
    try:
        children = children_of(process.pid)
        spawned = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(spawned) == 2  # the engine core and the second front end
        body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
        body |= {"temperature": 0, "max_tokens": 12}

        def ask() -> str:
            with httpx.Client(timeout=120) as client:  # a new connection each: the kernel spreads them
                return str(
                    client.post(f"{base_url}/v1/chat/completions", json=body).json()["choices"][0]["message"][
                        "content"
                    ]
                )

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: ask(), range(16)))
        assert len(set(answers)) == 1 and "Paris" in answers[0]
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 128 + signal.SIGINT
        assert wait_until(lambda: not any(is_running(pid) for pid in spawned), 10), (
            "a child outlived the server"
        )
    finally:
        stop_group(process)


def test_dead_core_turns_health_503_at_once() -> None:
    from conftest import load_engine, start_server

    from lmserve.config import ServeConfig

    engine = load_engine(max_batch_size=2)
    running = start_server(engine, ServeConfig(model_name=MODEL_NAME))
    try:
        assert httpx.get(f"{running.base_url}/health").status_code == 200
        os.kill(engine._owner.pid, signal.SIGKILL)
        assert wait_until(lambda: httpx.get(f"{running.base_url}/health").status_code == 503, 5)
        response = httpx.post(
            f"{running.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert response.status_code >= 500 and "error" in response.json()
    finally:
        running.stop()
        engine.shutdown()
