"""create_proxy_app(ProxyConfig) -> FastAPI: LMDeploy's proxy routes (/nodes/*, /v1/models) and every /v1/* relayed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmserve.config import ProxyConfig
from lmserve.serve.errors import (
    APIError,
    error_response,
    install_error_handlers,
    most_specific,
    validation_message,
)
from lmserve.serve.guard import GuardMiddleware
from lmserve.serve.proxy.forward import forward
from lmserve.serve.proxy.health import check_health_forever, fetch_model_cards, probe
from lmserve.serve.proxy.nodes import Node, NodePool, model_card, normalize_url

logger = logging.getLogger("lmserve.proxy")

# a request may wait long for its first byte (a non-streamed answer sends nothing until it is done), so
# reads have no limit: a node that dies resets the connection, one that hangs fails its health probes
RELAY_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None)
# one shared client; every concurrent stream holds a connection, so the pool is not the limit
RELAY_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256)


class NodeStatusIn(BaseModel):
    """LMDeploy's `status` of POST /nodes/add: what the node serves and how fast it is, both optional."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(default_factory=list)
    speed: float | None = Field(default=None, gt=0)


class NodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    status: NodeStatusIn | None = None


@dataclass
class ProxyState:
    config: ProxyConfig
    pool: NodePool
    client: httpx.AsyncClient

    @property
    def node_headers(self) -> dict[str, str]:
        """The proxy's own calls to nodes (their /v1/models) carry its first key: nodes share the proxy's keys."""
        keys = self.config.api_keys
        return {"authorization": f"Bearer {keys[0]}"} if keys else {}


def create_proxy_app(config: ProxyConfig) -> FastAPI:
    app = FastAPI(title="lmserve proxy", docs_url=None, redoc_url=None, lifespan=_lifespan(config))
    install_error_handlers(app)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route("/nodes/status", _nodes_status, methods=["GET"])
    app.add_api_route("/nodes/add", _nodes_add, methods=["POST"])
    app.add_api_route("/nodes/remove", _nodes_remove, methods=["POST"])
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app.add_api_route("/v1/{path:path}", _relay, methods=methods, include_in_schema=False)
    app.add_middleware(
        GuardMiddleware, api_keys=config.api_keys, max_body_bytes=config.max_body_bytes, metrics=None
    )
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    return app


def _lifespan(config: ProxyConfig) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=RELAY_TIMEOUT, limits=RELAY_LIMITS) as client:
            state = ProxyState(config, NodePool(), client)
            app.state.proxy = state
            for url in config.nodes:
                state.pool.add(Node(normalize_url(url)))
            await asyncio.gather(*(probe(node, client, state.node_headers) for node in state.pool.all()))
            checker = asyncio.create_task(
                check_health_forever(state.pool, client, config.health_check_interval, state.node_headers)
            )
            try:
                yield
            finally:
                checker.cancel()

    return lifespan


def _state(request: Request) -> ProxyState:
    return request.app.state.proxy  # type: ignore[no-any-return]


async def _health(request: Request) -> Response:
    """200 while at least one node is live, else 503."""
    if any(node.healthy for node in _state(request).pool.all()):
        return JSONResponse({"status": "ok"})
    return error_response(503, "no live node")


async def _models(request: Request) -> dict[str, Any]:
    """The union of the models the live nodes serve."""
    return {"object": "list", "data": _state(request).pool.live_model_cards()}


async def _nodes_status(request: Request) -> dict[str, dict[str, Any]]:
    """Every node by URL: models, unfinished, latency (last requests, s), speed, healthy, num_requests."""
    return _state(request).pool.status()


async def _nodes_add(node: NodeIn, request: Request) -> dict[str, Any]:
    """Add (or re-add) a node. With `status.models` it is taken as given (how api_servers register);
    without, the proxy asks the node's /v1/models and refuses a node it cannot reach."""
    state = _state(request)
    url = _url_param(node.url)
    status = node.status or NodeStatusIn()
    added = Node(url, [model_card(name) for name in status.models], status.speed, bool(status.models))
    if added.declared_models:
        await probe(added, state.client, state.node_headers)  # taken even if down: it may be starting
    else:
        try:
            added.model_cards = await fetch_model_cards(state.client, url, state.node_headers)
        except (httpx.HTTPError, ValueError) as error:
            raise APIError(400, f"url: cannot list the models of {url}: {error}", "url") from error
        added.healthy = True
    state.pool.add(added)
    logger.warning("node %s added, serving %s", url, added.models)
    return {url: added.status()}


async def _nodes_remove(request: Request, node_url: str | None = None) -> dict[str, str]:
    """Remove a node: body `{"url": ...}` (LMDeploy today) or `?node_url=` (LMDeploy before 0.7)."""
    body = await request.body()
    url = _url_param(_parse_node(body).url if body else node_url)
    if not _state(request).pool.remove(url):
        raise APIError(404, f"url: no node {url!r}; GET /nodes/status lists the nodes", "url")
    logger.warning("node %s removed", url)
    return {"removed": url}


def _parse_node(body: bytes) -> NodeIn:
    try:
        return NodeIn.model_validate_json(body)
    except ValidationError as error:
        message, param = validation_message(most_specific([dict(item) for item in error.errors()]))
        raise APIError(400, message, param) from error


def _url_param(url: str | None) -> str:
    if url is None:
        raise APIError(400, "url: give the node's URL", "url")
    try:
        return normalize_url(url)
    except ValueError as error:
        raise APIError(400, str(error), "url") from error


async def _relay(request: Request) -> Response:
    state = _state(request)
    return await forward(request, state.pool, state.client, state.config.routing_strategy)
