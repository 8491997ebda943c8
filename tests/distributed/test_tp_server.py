"""`serve api_server --tp 2 --device cpu --dtype float32` (rank 1 a worker process of the engine core) gives
tp=1's greedy text and logprobs; a killed worker ends the server with exit code 1, leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.distributed.tp_helpers import spawned_children_of
from tests.engine.test_model_folders import bpe_tokenizer, save_hf_folder
from tests.serve.conftest import children_of, free_port, wait_until

START_TIMEOUT_S = 240
LOGPROB_ATOL = 1e-3
"""float32 on both servers; tp=2 adds the partial sums of each row-parallel layer in another order."""
BODY = {
    "messages": [{"role": "user", "content": "Tell me about the sea and the ships on it."}],
    "max_tokens": 12,
    "temperature": 0,
    "logprobs": True,
    "top_logprobs": 3,
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    # wider init than HF's 0.02, so greedy text varies from token to token instead of repeating one
    model = save_hf_folder(folder, "llama", bpe_tokenizer(), initializer_range=0.2)
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    return folder


def start_server(folder: Path, tp: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "lmserve.cli.main", "serve", "api_server", str(folder)]
    command += ["--dtype", "float32", "--device", "cpu", "--tp", str(tp), "--session-len", "256"]
    command += ["--max-batch-size", "4", "--server-name", "127.0.0.1", "--server-port", str(port)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    return process, f"http://127.0.0.1:{port}"


def healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def servers(model_folder: Path) -> Iterator[dict[int, tuple[subprocess.Popen[bytes], str]]]:
    running = {tp: start_server(model_folder, tp) for tp in (1, 2)}
    try:
        for process, base_url in running.values():
            started = wait_until(lambda: healthy(base_url) or process.poll() is not None, START_TIMEOUT_S)  # noqa: B023
            assert started, "server did not start"
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        yield running
    finally:
        for process, _ in running.values():
            stop_group(process)


def chat(base_url: str) -> dict[str, Any]:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=BODY, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_tp2_server_gives_tp1_greedy_text_and_logprobs(servers: dict[int, Any]) -> None:
    tp1, tp2 = (chat(servers[tp][1]) for tp in (1, 2))
    assert tp2["message"]["content"] == tp1["message"]["content"]
    assert len(set(tp1["message"]["content"])) > 3, "degenerate text would make this comparison weak"
    for ours, theirs in zip(tp2["logprobs"]["content"], tp1["logprobs"]["content"], strict=True):
        assert ours["token"] == theirs["token"]
        assert [t["token"] for t in ours["top_logprobs"]] == [t["token"] for t in theirs["top_logprobs"]]
        assert abs(ours["logprob"] - theirs["logprob"]) < LOGPROB_ATOL


def test_killed_worker_ends_the_server_with_exit_code_1(servers: dict[int, Any]) -> None:
    process, _ = servers[2]
    [core] = spawned_children_of(process.pid)
    [worker] = spawned_children_of(core)
    os.kill(worker, signal.SIGKILL)
    assert process.wait(timeout=60) == 1
    assert not children_of(process.pid)
    assert process.stdout is not None
    assert b"tensor-parallel worker lmserve-tp1" in process.stdout.read()
