"""The proxy's routing strategies (LMDeploy's definitions) and node bookkeeping, without servers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lmserve.serve.proxy.nodes import Node, NodePool, model_card, normalize_url
from lmserve.serve.proxy.routing import choose_node, speeds


def node(name: str, speed: float | None = None, unfinished: int = 0, latency: tuple[float, ...] = ()) -> Node:
    made = Node(f"http://{name}:1", [model_card("m")], speed, healthy=True, unfinished=unfinished)
    made.latency.extend(latency)
    return made


def test_nodes_without_a_speed_count_as_the_mean_of_the_others() -> None:
    assert speeds([node("a", 2.0), node("b", 4.0), node("c")]) == [2.0, 4.0, 3.0]
    assert speeds([node("a"), node("b")]) == [1.0, 1.0]


def test_min_expected_latency_is_unfinished_over_speed() -> None:
    busy_fast, idle_slow = node("a", speed=4.0, unfinished=3), node("b", speed=1.0, unfinished=1)
    assert choose_node("min_expected_latency", [busy_fast, idle_slow]) is busy_fast  # 0.75 < 1
    busy_fast.unfinished = 5
    assert choose_node("min_expected_latency", [busy_fast, idle_slow]) is idle_slow  # 1.25 > 1


def test_min_expected_latency_breaks_ties_at_random() -> None:
    random.seed(0)
    nodes = [node("a"), node("b"), node("c")]
    picked = Counter(choose_node("min_expected_latency", nodes).url for _ in range(300))
    assert len(picked) == 3 and min(picked.values()) > 60


def test_random_is_weighted_by_speed() -> None:
    random.seed(0)
    nodes = [node("a", speed=3.0), node("b", speed=1.0)]
    picked = Counter(choose_node("random", nodes).url for _ in range(4000))
    assert 0.72 < picked["http://a:1"] / 4000 < 0.78


def test_min_observed_latency_takes_the_lowest_mean_and_tries_new_nodes_first() -> None:
    slow, fast = node("a", latency=(0.5, 0.7)), node("b", latency=(0.9, 0.1))
    assert choose_node("min_observed_latency", [slow, fast]) is fast  # mean 0.5 < 0.6
    fresh = node("c")
    assert choose_node("min_observed_latency", [slow, fast, fresh]) is fresh
    fresh.unfinished, other = 1, node("d")
    assert choose_node("min_observed_latency", [fresh, other]) is other  # both unobserved: the idler one


def test_latency_window_keeps_the_last_15_and_connect_failures_leave_none() -> None:
    target = node("a")
    for _ in range(20):
        target.finish_request(target.start_request(), completed=True)
    started = target.start_request()
    target.finish_request(started, completed=False)
    assert len(target.latency) == 15 and target.num_requests == 21 and target.unfinished == 0


def test_pool_serving_and_union_of_live_models() -> None:
    pool = NodePool()
    a, b = node("a"), Node("http://b:1", [model_card("m"), model_card("n")], healthy=False)
    pool.add(a), pool.add(b)
    assert pool.serving("n") == [b] and pool.serving(None) == [a, b] and pool.serving("x") == []
    assert [card["id"] for card in pool.live_model_cards()] == ["m"]
    b.healthy = True
    assert [card["id"] for card in pool.live_model_cards()] == ["m", "n"]
    assert pool.remove("http://b:1") and not pool.remove("http://b:1")


@pytest.mark.parametrize("url", ["10.0.0.2:23333", "ftp://x", "http://", "http:///"])
def test_bad_node_urls_are_refused_naming_url(url: str) -> None:
    with pytest.raises(ValueError, match="url="):
        normalize_url(url)


def test_node_url_loses_its_trailing_slash() -> None:
    assert normalize_url("http://10.0.0.2:23333/") == "http://10.0.0.2:23333"
