"""`serve api_server --dp N` on CUDA: more replicas than GPUs is an error naming --dp; two replicas use two GPUs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(*flags: str) -> list[str]:
    return [sys.executable, "-m", "lmserve.cli.main", "serve", "api_server", "--device", "cuda", *flags]


def test_dp_above_the_gpus_present_names_dp() -> None:
    dp = torch.cuda.device_count() + 1
    result = subprocess.run(_serve("--dp", str(dp)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--dp {dp}" in result.stderr and f"{dp - 1} CUDA GPU(s) present" in result.stderr


def _tree(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {pid}.union(*(_tree(int(child)) for child in children)) if children else {pid}


def _gpus_in_use(pids: set[int]) -> set[str]:
    query = ["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id", "--format=csv,noheader"]
    rows = [
        line.split(", ") for line in subprocess.run(query, capture_output=True, text=True).stdout.splitlines()
    ]
    return {bus for pid, bus in rows if int(pid) in pids}


def _status(base_url: str) -> dict[str, dict[str, object]]:
    try:
        return httpx.get(f"{base_url}/nodes/status", timeout=5).json()  # type: ignore[no-any-return]
    except httpx.TransportError:
        return {}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_dp_2_puts_one_replica_on_each_gpu() -> None:
    port = _free_port()
    process = subprocess.Popen(
        _serve("--dp", "2", "--server-name", "127.0.0.1", "--server-port", str(port)), start_new_session=True
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert process.poll() is None, "the server exited"
            if sum(node["healthy"] for node in _status(base_url).values()) == 2:
                break
            time.sleep(1)
        else:
            raise AssertionError("the replicas did not come up")
        body = {"model": "smollm2-135m-instruct", "prompt": "The sky is", "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).status_code == 200
        assert len(_gpus_in_use(_tree(process.pid))) == 2
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
