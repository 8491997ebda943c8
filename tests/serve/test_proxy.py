"""`serve proxy` in front of two real api_servers (the embedded SmolLM2): routing, faults, streams, keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from conftest import free_port, wait_until

from lmserve.config import ProxyConfig
from lmserve.serve.proxy.app import create_proxy_app

KEY = "sk-proxy-test"
AUTH = {"authorization": f"Bearer {KEY}"}
MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Name three colours."}]
START_TIMEOUT_S = 300
HEALTH_INTERVAL_S = 0.3


@dataclass
class Proxy:
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/nodes/status", headers=AUTH, timeout=10).json()  # type: ignore[no-any-return]


def start_proxy(**options: Any) -> Proxy:
    """The proxy app under uvicorn on a thread (lifespan on: its health checker runs)."""
    port = free_port()
    config = ProxyConfig(server_port=port, health_check_interval=HEALTH_INTERVAL_S, **options)
    server = uvicorn.Server(
        uvicorn.Config(create_proxy_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, 30), "proxy did not start"
    return Proxy(f"http://127.0.0.1:{port}", server, thread)


@dataclass
class Node:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_node(port: int, *extra: str) -> Node:
    """`serve api_server` as a user starts it, in its own process group (so a kill takes its engine core)."""
    command = [sys.executable, "-m", "lmserve.cli.main", "serve", "api_server", "--dtype", "float32"]
    command += ["--server-name", "127.0.0.1", "--server-port", str(port), "--model-name", MODEL]
    command += ["--api-keys", KEY, "--max-batch-size", "8", "--session-len", "1024", *extra]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    return Node(port, process)


def kill_node(node: Node) -> None:
    """kill -9 of the server and its engine core."""
    if node.process.poll() is None:
        os.killpg(node.process.pid, signal.SIGKILL)
    node.process.wait(timeout=60)


def healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Proxy, list[Node]]]:
    """A keyed proxy (min_expected_latency) and two api_servers that join it with --proxy-url."""
    proxy = start_proxy(api_keys=(KEY,))
    nodes = [start_node(free_port(), "--proxy-url", proxy.base_url) for _ in range(2)]
    try:
        joined = lambda: sum(s["healthy"] for s in proxy.status().values()) == 2  # noqa: E731
        assert wait_until(joined, START_TIMEOUT_S), "the nodes did not join the proxy"
        yield proxy, nodes
    finally:
        for node in nodes:
            kill_node(node)
        proxy.stop()


def chat(base_url: str, **body: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0} | body
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def num_requests(proxy: Proxy) -> dict[str, int]:
    return {url: status["num_requests"] for url, status in proxy.status().items()}


def test_nodes_register_themselves_with_their_model(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, nodes = cluster
    status = proxy.status()
    assert set(status) == {node.url for node in nodes}
    assert all(entry["models"] == [MODEL] and entry["unfinished"] == 0 for entry in status.values())


def test_min_expected_latency_spreads_concurrent_requests_evenly(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, _ = cluster
    before = num_requests(proxy)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: chat(proxy.base_url, max_tokens=8, ignore_eos=True), range(6)))
    assert all(answer.status_code == 200 for answer in answers)
    after = num_requests(proxy)
    assert sorted(after[url] - before[url] for url in after) == [3, 3]
    assert all(entry["unfinished"] == 0 and entry["latency"] for entry in proxy.status().values())


def sse_without_ids(text: str) -> list[Any]:
    """The SSE events with the per-request fields (id, created) removed; the rest must match exactly."""
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: {"):
            event = json.loads(block[6:])
            event.pop("id"), event.pop("created")
            events.append(event)
        elif block:
            events.append(block)
    return events


def test_stream_through_the_proxy_equals_the_stream_from_a_node(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, nodes = cluster
    body = {"stream": True, "max_tokens": 12, "stream_options": {"include_usage": True}}
    direct = chat(nodes[0].url, **body)
    proxied = [chat(proxy.base_url, **body) for _ in range(2)]  # whichever node answers
    assert direct.headers["content-type"].startswith("text/event-stream")
    for response in proxied:
        assert response.headers["content-type"] == direct.headers["content-type"]
        assert sse_without_ids(response.text) == sse_without_ids(direct.text)
    assert sse_without_ids(direct.text)[-1] == "data: [DONE]"


def test_chunks_arrive_as_the_node_sends_them(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, _ = cluster
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 32, "ignore_eos": True, "stream": True}
    arrivals = []
    with httpx.stream(
        "POST", f"{proxy.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
    ) as r:
        for _ in r.iter_raw():
            arrivals.append(time.monotonic())
    assert len(arrivals) > 5, "the proxy buffered the stream instead of relaying chunks"
    assert arrivals[-1] - arrivals[0] > 0.05


def test_a_client_that_leaves_mid_stream_frees_the_node(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, nodes = cluster
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{proxy.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
    ) as r:
        next(r.iter_raw())
    idle = lambda: all(entry["unfinished"] == 0 for entry in proxy.status().values())  # noqa: E731
    assert wait_until(idle, 30)
    for node in nodes:  # the node saw the proxy's connection close and aborted the request
        assert wait_until(lambda url=node.url: "lmserve_num_requests_running 0.0" in metrics(url), 30)


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text


def test_api_key_is_checked_at_the_proxy(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, _ = cluster
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        response = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{proxy.base_url}/nodes/status", headers=headers, timeout=10).status_code == 401
    assert httpx.get(f"{proxy.base_url}/health", timeout=10).status_code == 200


def test_openai_client_through_the_proxy(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, _ = cluster
    client = openai.OpenAI(base_url=f"{proxy.base_url}/v1", api_key=KEY, max_retries=0)
    assert [model.id for model in client.models.list()] == [MODEL]
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == (
        answer.choices[0].message.content
    )
    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0)
    assert completion.choices[0].text
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=HELLO)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"


def test_models_union_404_and_503(cluster: tuple[Proxy, list[Node]]) -> None:
    _, nodes = cluster
    proxy = start_proxy(api_keys=(KEY,), routing_strategy="random")
    try:
        add = lambda body: httpx.post(f"{proxy.base_url}/nodes/add", json=body, headers=AUTH, timeout=30)  # noqa: E731
        assert add({"url": nodes[0].url}).status_code == 200  # models asked from the node
        assert (
            add({"url": nodes[1].url + "/", "status": {"models": ["other-model"], "speed": 2}}).status_code
            == 200
        )
        dead = f"http://127.0.0.1:{free_port()}"
        assert add({"url": dead}).status_code == 400  # nothing answers there
        assert add({"url": dead, "status": {"models": ["ghost"]}}).status_code == 200
        assert wait_until(lambda: not proxy.status()[dead]["healthy"], 10)
        models = httpx.get(f"{proxy.base_url}/v1/models", headers=AUTH, timeout=10).json()["data"]
        assert sorted(card["id"] for card in models) == sorted(
            [MODEL, "other-model"]
        )  # the live nodes' union
        assert chat(proxy.base_url).status_code == 200
        missing = chat(proxy.base_url, model="nope")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
        down = chat(proxy.base_url, model="ghost")
        assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"
        removed = httpx.post(f"{proxy.base_url}/nodes/remove", json={"url": dead}, headers=AUTH, timeout=10)
        assert removed.status_code == 200 and dead not in proxy.status()
    finally:
        proxy.stop()


def test_killed_node_is_dropped_and_a_restarted_one_comes_back(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, nodes = cluster
    victim = nodes[1]
    kill_node(victim)
    # before any health probe: the proxy finds the refused connection and retries on the live node
    assert all(chat(proxy.base_url).status_code == 200 for _ in range(4))
    assert wait_until(lambda: not proxy.status()[victim.url]["healthy"], 10)
    before = num_requests(proxy)[victim.url]
    assert all(chat(proxy.base_url).status_code == 200 for _ in range(3))
    assert num_requests(proxy)[victim.url] == before
    # restarted without --proxy-url: the health check alone brings it back
    nodes[1] = start_node(victim.port)
    assert wait_until(lambda: proxy.status()[victim.url]["healthy"], START_TIMEOUT_S)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: chat(proxy.base_url, max_tokens=8, ignore_eos=True), range(4)))
    assert num_requests(proxy)[victim.url] > before


def test_a_stopped_node_leaves_the_proxy(cluster: tuple[Proxy, list[Node]]) -> None:
    proxy, nodes = cluster
    nodes[0].process.terminate()  # SIGTERM to the server, which stops its engine core itself
    assert nodes[0].process.wait(timeout=60) == 0
    assert nodes[0].url not in proxy.status()
