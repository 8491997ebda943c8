"""Node health: a periodic GET /health of every node, and fetching what a node serves from its /v1/models."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from lmserve.serve.proxy.nodes import Node, NodePool

logger = logging.getLogger("lmserve.proxy")

PROBE_TIMEOUT_S = 5.0


async def fetch_model_cards(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> list[dict[str, Any]]:
    """The node's /v1/models cards; httpx.HTTPError when it cannot be reached or does not answer a model list."""
    response = await client.get(f"{url}/v1/models", headers=headers, timeout=PROBE_TIMEOUT_S)
    response.raise_for_status()
    answer = response.json()
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not all(isinstance(card, dict) and "id" in card for card in data):
        raise httpx.DecodingError(f"{url}/v1/models did not answer an OpenAI model list")
    return data


async def probe(node: Node, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """Mark the node live if /health answers 200 (refreshing its models when it comes back), dead otherwise."""
    try:
        response = await client.get(f"{node.url}/health", timeout=PROBE_TIMEOUT_S)
        alive = response.status_code == 200
        if alive and not node.declared_models and (not node.healthy or not node.model_cards):
            node.model_cards = await fetch_model_cards(client, node.url, headers)
    except (httpx.HTTPError, ValueError) as error:
        alive = False
        reason = str(error) or type(error).__name__
    else:
        reason = f"/health answered {response.status_code}"
    if alive != node.healthy:
        if alive:
            logger.warning("node %s is up, serving %s", node.url, node.models)
        else:
            logger.warning("node %s is down (%s); routing around it until /health answers", node.url, reason)
    node.healthy = alive


async def check_health_forever(
    pool: NodePool, client: httpx.AsyncClient, interval: float, headers: dict[str, str]
) -> None:
    """Probe every node each `interval` seconds, all at once (one slow node does not delay the others)."""
    while True:
        await asyncio.gather(*(probe(node, client, headers) for node in pool.all()))
        await asyncio.sleep(interval)
