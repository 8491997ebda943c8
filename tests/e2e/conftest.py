"""Browser-test fixtures: a real api_server with the embedded SmolLM2 on a loopback port, and Chromium."""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = os.environ.get("LMSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "e2e-secret-key"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@dataclass
class RunningServer:
    url: str
    engine: Any
    api_key: str


def _browser_missing_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="session")
def browser_available() -> None:
    reason = _browser_missing_reason()
    if reason:
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, thread: threading.Thread, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the api_server thread exited during startup")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s}s")


@pytest.fixture(scope="module")
def server(browser_available: None) -> Iterator[RunningServer]:
    """The real app over the real engine (SmolLM2, fp32, CPU), with an API key required."""
    import uvicorn

    from lmserve.config import EngineConfig, ServeConfig
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.serve.app import create_app

    engine = AsyncEngine.from_pretrained(None, EngineConfig(dtype="float32"))
    app = create_app(engine, ServeConfig(model_name="smollm2", api_keys=(API_KEY,)))
    port = _free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, name="e2e-api-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, thread)
        yield RunningServer(url=url, engine=engine, api_key=API_KEY)
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)
        for name in ("shutdown", "close", "stop"):
            if callable(getattr(engine, name, None)):
                getattr(engine, name)()
                break


@pytest.fixture(scope="module")
def browser(browser_available: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open_page(browser: Any, server: RunningServer, **context_options: Any) -> Iterator[Any]:
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.goto(server.url + "/chat/")
    yield page
    context.close()
    assert not page_errors, f"uncaught JavaScript errors on the page: {page_errors}"


@pytest.fixture
def page(browser: Any, server: RunningServer) -> Iterator[Any]:
    """A fresh desktop-sized page (empty local storage) at /chat/."""
    yield from _open_page(browser, server, viewport={"width": 1280, "height": 800})


@pytest.fixture
def phone_page(browser: Any, server: RunningServer) -> Iterator[Any]:
    """A fresh phone-sized page (390x844, touch) at /chat/."""
    yield from _open_page(
        browser,
        server,
        viewport={"width": 390, "height": 844},
        is_mobile=True,
        has_touch=True,
        device_scale_factor=2,
    )


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
