"""`serve proxy` and `serve api_server --dp N` from the command line: flag errors, and two CPU replicas (slow)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until

from lmserve.cli.main import main

START_TIMEOUT_S = 300


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["serve", "api_server", "--dp", "0"], "dp=0 must be >= 1"),
        (["serve", "api_server", "--dp", "2", "--proxy-url", "http://h:8000"], "--dp above 1"),
        (["serve", "api_server", "--proxy-url", "h:8000"], "proxy_url='h:8000'"),
        (["serve", "proxy", "--health-check-interval", "0"], "health_check_interval=0.0"),
        (["serve", "proxy", "--nodes", "10.0.0.2:23333"], "nodes: '10.0.0.2:23333'"),
        (["serve", "proxy", "--server-port", "0"], "server_port=0"),
    ],
)
def test_bad_flags_are_named(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_unknown_routing_strategy_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "proxy", "--routing-strategy", "round_robin"])
    assert "min_expected_latency" in capsys.readouterr().err


def test_dp_replica_port_in_use_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 2))
        argv = ["serve", "api_server", "--device", "cpu", "--dp", "2", "--server-port", str(port)]
        assert main(argv) == 2
    assert f"replica port {port + 2}" in capsys.readouterr().err


@pytest.mark.slow
def test_dp_2_on_cpu_serves_two_replicas_behind_one_port() -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "lmserve.cli.main",
        "serve",
        "api_server",
        "--device",
        "cpu",
        "--dp",
        "2",
    ]
    command += ["--dtype", "float32", "--server-name", "127.0.0.1", "--server-port", str(port)]
    command += ["--max-batch-size", "4", "--session-len", "1024"]  # a small KV cache each: two fit in RAM
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        nodes = lambda: httpx.get(f"{base_url}/nodes/status", timeout=5).json()  # noqa: E731
        up = lambda: sum(node["healthy"] for node in nodes().values()) == 2  # noqa: E731
        assert wait_until(lambda: _answers(base_url) and up(), START_TIMEOUT_S), "replicas did not come up"
        assert sorted(nodes()) == [f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"]
        body = {"model": "smollm2-135m-instruct", "prompt": "The sky is", "max_tokens": 8, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(f"{base_url}/v1/completions", json=body, timeout=120), range(4))
            )
        assert (
            len({answer.json()["choices"][0]["text"] for answer in answers}) == 1
        )  # greedy: same text on both
        assert [node["num_requests"] for node in nodes().values()] == [2, 2]
        os.kill(_replica_pids(process.pid)[0], signal.SIGKILL)
        assert wait_until(lambda: sum(node["healthy"] for node in nodes().values()) == 1, 30)
        assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0
    assert b"exited with code -9; 1 of 2 still serving" in stderr


def _answers(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _replica_pids(pid: int) -> list[int]:
    """The replica processes under the --dp server (spawned children; not multiprocessing's resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        pids = [int(child) for child in children.read().split()]
    return [child for child in pids if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def test_serve_proxy_command_starts_probes_its_nodes_and_stops_on_sigterm() -> None:
    port, node_port = free_port(), free_port()
    command = [sys.executable, "-m", "lmserve.cli.main", "serve", "proxy", "--server-name", "127.0.0.1"]
    command += ["--server-port", str(port), "--nodes", f"http://127.0.0.1:{node_port}/"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _status_code(f"{base_url}/health") == 503, 60)  # its one node is down
        status = httpx.get(f"{base_url}/nodes/status", timeout=5).json()
        assert status == {
            f"http://127.0.0.1:{node_port}": {
                "models": [],
                "unfinished": 0,
                "latency": [],
                "speed": None,
                "healthy": False,
                "num_requests": 0,
            }
        }
    finally:
        process.terminate()
        stdout, _ = process.communicate(timeout=60)
    assert f"proxy at http://127.0.0.1:{port}/v1".encode() in stdout


def _status_code(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None
