"""An api_server started with `--proxy-url` joins that proxy once it listens, and leaves it when it stops."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger("lmserve.serve")

REGISTER_TIMEOUT_S = 10.0
_WILDCARDS = ("0.0.0.0", "::", "")


def advertised_url(server_name: str, server_port: int, proxy_url: str) -> str:
    """The URL the proxy can reach this server at: the listening address, or for a wildcard the local
    address that routes to the proxy (a UDP connect picks it without sending a packet)."""
    host = server_name
    if host in _WILDCARDS:
        proxy = urlsplit(proxy_url)
        family = socket.AF_INET6 if ":" in (proxy.hostname or "") else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((proxy.hostname or "127.0.0.1", proxy.port or 80))
            host = probe.getsockname()[0]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server_port}"


def _auth(api_keys: tuple[str, ...]) -> dict[str, str]:
    # the proxy forwards clients' keys to its nodes, so a node and its proxy share keys: use our first
    return {"authorization": f"Bearer {api_keys[0]}"} if api_keys else {}


def register(proxy_url: str, node_url: str, model_names: list[str], api_keys: tuple[str, ...]) -> bool:
    """POST /nodes/add with our models (LMDeploy's registration); a failure is logged, not fatal."""
    body = {"url": node_url, "status": {"models": model_names}}
    try:
        response = httpx.post(
            f"{proxy_url.rstrip('/')}/nodes/add",
            json=body,
            headers=_auth(api_keys),
            timeout=REGISTER_TIMEOUT_S,
        )
        response.raise_for_status()
    except httpx.HTTPError as error:
        logger.error("could not register %s with the proxy %s: %s", node_url, proxy_url, error)
        return False
    logger.info("registered %s with the proxy %s", node_url, proxy_url)
    return True


def deregister(proxy_url: str, node_url: str, api_keys: tuple[str, ...]) -> None:
    """POST /nodes/remove, so the proxy stops routing to us at once rather than at its next health probe."""
    try:
        response = httpx.post(
            f"{proxy_url.rstrip('/')}/nodes/remove",
            json={"url": node_url},
            headers=_auth(api_keys),
            timeout=REGISTER_TIMEOUT_S,
        )
        response.raise_for_status()
    except httpx.HTTPError as error:
        logger.warning("could not leave the proxy %s: %s", proxy_url, error)


def register_when_listening(
    is_started: Callable[[], bool], should_stop: Callable[[], bool], join: Callable[[], None]
) -> threading.Thread:
    """Run `join` on a thread once `is_started()` (uvicorn listens), unless `should_stop()` comes first."""

    def wait_then_join() -> None:
        while not is_started():
            if should_stop():
                return
            time.sleep(0.05)
        join()

    thread = threading.Thread(target=wait_then_join, name="lmserve-proxy-registration", daemon=True)
    thread.start()
    return thread
