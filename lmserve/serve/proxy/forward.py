"""Relaying one request to a node: headers in, the node's status, headers and bytes out as they arrive."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator

import anyio
import httpx
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmserve.serve.errors import APIError, error_body
from lmserve.serve.proxy.nodes import Node, NodePool
from lmserve.serve.proxy.routing import choose_node

logger = logging.getLogger("lmserve.proxy")

# hop-by-hop headers (RFC 9110 7.6.1) belong to one connection; host, date and server are set per hop
_REQUEST_DROP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
_REQUEST_DROP |= {"proxy-authorization", "proxy-connection", "content-length"}
_RESPONSE_DROP = {
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "date",
    "server",
}


def requested_model(body: bytes) -> str | None:
    """The `model` of a JSON object body; None for other bodies (the node validates them)."""
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else None


def live_nodes_for(pool: NodePool, model: str | None) -> list[Node]:
    """404 when no node lists the model, 503 when the ones that do are all down (OpenAI's error shape)."""
    candidates = pool.serving(model)
    if model is not None and not candidates:
        message = f"the model {model!r} is not served by any node; GET /v1/models lists the models"
        raise APIError(404, message, "model", "model_not_found")
    live = [node for node in candidates if node.healthy]
    if not live:
        what = f"model {model!r}" if model is not None else "this request"
        raise APIError(503, f"no live node serves {what}; retry later", None, "no_live_node")
    return live


async def forward(
    request: Request, pool: NodePool, client: httpx.AsyncClient, strategy: str
) -> StreamingResponse:
    """Send the request to a node chosen by the strategy; a node that refuses the connection is marked dead
    and the next one is tried (the request never reached it, so no work is done twice)."""
    body = await request.body()
    live = live_nodes_for(pool, requested_model(body))
    headers = _forwarded_headers(request)
    while live:
        node = choose_node(strategy, live)
        started = node.start_request()
        upstream_request = client.build_request(
            request.method,
            node.url + request.url.path,
            params=request.url.query,
            headers=headers,
            content=body,
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            node.finish_request(started, completed=False)
            _mark_dead(node, error)
            live.remove(node)
            continue
        except httpx.TransportError as error:  # it got the request, then failed: not safe to send again
            node.finish_request(started, completed=False)
            _mark_dead(node, error)
            raise APIError(
                502, f"the node {node.url} failed before answering: {error}", None, "node_failed"
            ) from error
        except BaseException:
            node.finish_request(started, completed=False)
            raise
        return RelayResponse(upstream, node, started)
    raise APIError(
        503, "every node serving this request refused the connection; retry later", None, "no_live_node"
    )


def _mark_dead(node: Node, error: Exception) -> None:
    if node.healthy:
        logger.warning("node %s is down (%s); routing around it until /health answers", node.url, error)
    node.healthy = False


class RelayResponse(StreamingResponse):
    """The node's status, headers and bytes untouched, each chunk sent on as it arrives. A node lost
    mid-stream ends an SSE stream with the api_server's own mid-stream error event; other bodies are cut short."""

    def __init__(self, upstream: httpx.Response, node: Node, started: float) -> None:
        self.upstream, self.node, self.started = upstream, node, started
        self.completed = False
        self.chunks = self._chunks()
        super().__init__(self.chunks, status_code=upstream.status_code, headers=_response_headers(upstream))

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self.upstream.aiter_raw():
                yield chunk
            self.completed = True
        except httpx.TransportError as error:
            logger.warning("node %s failed mid-response: %s", self.node.url, error)
            if self.upstream.headers.get("content-type", "").startswith("text/event-stream"):
                yield _stream_error(self.node)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # here rather than in the generator: a client gone before the first chunk never starts it
        try:
            await super().__call__(scope, receive, send)
        finally:
            # an error answer is no sample of how fast the node generates
            self.node.finish_request(self.started, self.completed and self.upstream.status_code < 400)
            # a client that left cancels us: shield the close, or the node's connection leaks
            with anyio.CancelScope(shield=True):
                await self.chunks.aclose()
                await self.upstream.aclose()


def _stream_error(node: Node) -> bytes:
    message = f"the node serving this stream ({node.url}) failed; the answer is incomplete"
    event = json.dumps(error_body(502, message, None, "node_failed"))
    return f"data: {event}\n\ndata: [DONE]\n\n".encode()


def _forwarded_headers(request: Request) -> dict[str, str]:
    headers = {name: value for name, value in request.headers.items() if name.lower() not in _REQUEST_DROP}
    client_host = request.client.host if request.client else ""
    previous = request.headers.get("x-forwarded-for")
    headers["x-forwarded-for"] = f"{previous}, {client_host}" if previous else client_host
    headers["x-forwarded-host"] = request.headers.get("host", "")
    headers["x-forwarded-proto"] = request.url.scheme
    return headers


def _response_headers(upstream: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in upstream.headers.items() if name.lower() not in _RESPONSE_DROP}
