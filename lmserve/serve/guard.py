"""ASGI middleware in front of every route: body-size limit (413), API keys (401), request counting."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.serve.errors import error_body
from lmserve.serve.metrics import ServerMetrics

# open without a key: liveness probe, the Swagger page and its assets, the web page's static shell
_OPEN_EXACT = {"/", "/health", "/openapi.json", "/chat"}
_OPEN_PREFIXES = ("/static/", "/chat/")
_KNOWN_ROUTES = {
    "/",
    "/health",
    "/metrics",
    "/openapi.json",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/encode",
    "/abort_request",
}


def needs_key(path: str) -> bool:
    return path not in _OPEN_EXACT and not path.startswith(_OPEN_PREFIXES)


def route_label(path: str) -> str:
    """A bounded label set for metrics: known routes by name, everything else as 'other'."""
    if path in _KNOWN_ROUTES:
        return path
    for prefix in _OPEN_PREFIXES:
        if path.startswith(prefix):
            return prefix + "*"
    return "other"


def key_matches(header: str | None, api_keys: tuple[str, ...]) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time against every key."""
    if not header or not header.lower().startswith("bearer "):
        return False
    return _is_a_key(header[7:].strip(), api_keys)


def x_api_key_matches(header: str | None, api_keys: tuple[str, ...]) -> bool:
    """Anthropic's `x-api-key: KEY` (what the anthropic client sends), compared the same way."""
    if not header:
        return False
    return _is_a_key(header.strip(), api_keys)


def _is_a_key(given_text: str, api_keys: tuple[str, ...]) -> bool:
    given = given_text.encode()
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


class GuardMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass straight through."""

    def __init__(
        self, app: ASGIApp, api_keys: tuple[str, ...], max_body_bytes: int, metrics: ServerMetrics | None
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status: dict[str, int] = {}
        send = self._recording(send, status)
        try:
            await self._guarded(scope, receive, send, path)
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(
                    route=route_label(path), status=str(status.get("code", 500))
                ).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_keys and scope["method"] != "OPTIONS" and needs_key(path):
            if not (
                key_matches(headers.get("authorization"), self.api_keys)
                or x_api_key_matches(headers.get("x-api-key"), self.api_keys)
            ):
                message = (
                    "invalid or missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)"
                )
                await _send_error(send, 401, message, code="invalid_api_key")
                return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(send, 413, self._too_large(int(declared)))
            return
        buffered = await self._read_body(receive)
        if buffered is None:
            await _send_error(send, 413, self._too_large(None))
            return
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            scope = _as_json(scope)
        await self.app(scope, _replay(buffered, receive), send)

    def _too_large(self, size: int | None) -> str:
        got = f" ({size} bytes)" if size is not None else ""
        return f"request body too large{got}: the limit is {self.max_body_bytes} bytes"

    async def _read_body(self, receive: Receive) -> list[Message] | None:
        """Read the whole body up front (JSON bodies are small); None if it passes the limit."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    @staticmethod
    def _recording(send: Send, status: dict[str, int]) -> Send:
        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        return recording_send


def _as_json(scope: Scope) -> Scope:
    """Every POST route takes JSON: read it as JSON even when curl -d sent a form content type."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _replay(buffered: list[Message], receive: Receive) -> Receive:
    pending = list(buffered)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _send_error(send: Send, status_code: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status_code, message, None, code)).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status_code == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
