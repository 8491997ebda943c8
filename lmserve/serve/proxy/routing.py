"""The three routing strategies of LMDeploy's proxy, over the live nodes that serve a request's model."""

from __future__ import annotations

import random
import statistics

from lmserve.serve.proxy.nodes import Node


def choose_node(strategy: str, nodes: list[Node]) -> Node:
    """Pick one of `nodes` (non-empty, all live). Strategies as LMDeploy defines them:

    - random: weighted by each node's speed;
    - min_expected_latency: fewest unfinished requests per unit of speed (ties broken at random);
    - min_observed_latency: lowest mean latency of its last requests.
    """
    assert nodes, "the caller answers 503 when no live node serves the model"
    if strategy == "random":
        return random.choices(nodes, weights=speeds(nodes))[0]
    if strategy == "min_expected_latency":
        return _min_expected_latency(nodes)
    if strategy == "min_observed_latency":
        return _min_observed_latency(nodes)
    raise ValueError(
        f"routing_strategy={strategy!r} must be random, min_expected_latency or min_observed_latency"
    )


def speeds(nodes: list[Node]) -> list[float]:
    """Registered speeds; a node registered without one counts as the mean of the others (1 when none has)."""
    known = [node.speed for node in nodes if node.speed is not None]
    default = statistics.fmean(known) if known else 1.0
    return [node.speed if node.speed is not None else default for node in nodes]


def _min_expected_latency(nodes: list[Node]) -> Node:
    # shuffled first so that at low load (all queues empty) requests still spread, as LMDeploy does
    order = list(zip(nodes, speeds(nodes), strict=True))
    random.shuffle(order)
    return min(order, key=lambda pair: pair[0].unfinished / pair[1])[0]


def _min_observed_latency(nodes: list[Node]) -> Node:
    # LMDeploy scores a node with no finished request as infinitely slow, so a node that joins late never
    # gets one; we score it 0 (try it first) and break ties by the fewest unfinished requests.
    order = list(nodes)
    random.shuffle(order)
    return min(order, key=lambda node: (observed_latency(node), node.unfinished))


def observed_latency(node: Node) -> float:
    return statistics.fmean(node.latency) if node.latency else 0.0
