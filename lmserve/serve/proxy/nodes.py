"""The proxy's view of its nodes: what each serves, its load, its recent latencies, whether it answers."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# LMDeploy's LATENCY_DEQUE_LEN: min_observed_latency averages a node's last 15 request latencies
LATENCY_WINDOW = 15


@dataclass
class Node:
    """One api_server as the proxy sees it; mutated only on the proxy's event loop."""

    url: str
    model_cards: list[dict[str, Any]] = field(default_factory=list)
    speed: float | None = None
    """Relative speed the node was registered with (LMDeploy's `status.speed`); None = the mean of the others."""
    declared_models: bool = False
    """Models came with the registration (kept as given) rather than from the node's /v1/models."""
    healthy: bool = False
    unfinished: int = 0
    num_requests: int = 0
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    @property
    def models(self) -> list[str]:
        return [str(card["id"]) for card in self.model_cards]

    def start_request(self) -> float:
        self.unfinished += 1
        self.num_requests += 1
        return time.monotonic()

    def finish_request(self, started: float, completed: bool) -> None:
        """A request that never reached the node (connect failure) leaves no latency behind."""
        self.unfinished -= 1
        if completed:
            self.latency.append(time.monotonic() - started)

    def status(self) -> dict[str, Any]:
        """LMDeploy's `Status` fields (models, unfinished, latency, speed) plus ours."""
        return {
            "models": self.models,
            "unfinished": self.unfinished,
            "latency": list(self.latency),
            "speed": self.speed,
            "healthy": self.healthy,
            "num_requests": self.num_requests,
        }


def model_card(name: str) -> dict[str, Any]:
    """The card of a model a node was registered with by name only."""
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lmserve", "root": name}


class NodePool:
    """All known nodes by URL; dead ones stay (not routed to) until they answer again or are removed."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}

    def add(self, node: Node) -> None:
        """Adding a URL again replaces its entry (a restarted server registers anew)."""
        self._nodes[node.url] = node

    def remove(self, url: str) -> bool:
        return self._nodes.pop(url, None) is not None

    def get(self, url: str) -> Node | None:
        return self._nodes.get(url)

    def all(self) -> list[Node]:
        return list(self._nodes.values())

    def serving(self, model: str | None) -> list[Node]:
        """Nodes that list `model` (alive or not); every node when the request names none."""
        return [node for node in self._nodes.values() if model is None or model in node.models]

    def live_model_cards(self) -> list[dict[str, Any]]:
        """The union of the live nodes' models, each once (the first node's card)."""
        cards: dict[str, dict[str, Any]] = {}
        for node in self._nodes.values():
            if node.healthy:
                for card in node.model_cards:
                    cards.setdefault(str(card["id"]), card)
        return list(cards.values())

    def status(self) -> dict[str, dict[str, Any]]:
        return {url: node.status() for url, node in self._nodes.items()}


def normalize_url(url: str) -> str:
    """`http://host:port` without a trailing slash; ValueError naming `url` otherwise."""
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise ValueError(f"url={url!r} must be an http:// or https:// URL such as http://10.0.0.2:23333")
    return url.rstrip("/")
