"""The api_server with --adapters: /v1/models lists them under the base, `model: NAME` picks one per request."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmserve.cli.engine_args import engine_config_from_args
from lmserve.cli.main import build_parser
from lmserve.cli.serve import serve_config_from_args
from lmserve.config import ServeConfig
from lmserve.lora.random import save_random_adapter
from lmserve.models.loader import load_model_config, resolve_model
from tests.serve.conftest import MODEL_NAME, RunningServer, load_engine, start_server

ADAPTERS = ("terse", "wordy")


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf_path: Path) -> dict[str, str]:
    config = load_model_config(resolve_model(None))
    root = tmp_path_factory.mktemp("adapters")
    return {
        "terse": save_random_adapter(str(root / "terse"), config, rank=8, seed=1),
        "wordy": save_random_adapter(
            str(root / "wordy"), config, rank=16, targets=("q_proj", "v_proj", "down_proj"), seed=2
        ),
    }


@pytest.fixture(scope="module")
def server(adapter_folders: dict[str, str]) -> Iterator[RunningServer]:
    engine = load_engine(adapters=adapter_folders)
    running = start_server(engine, ServeConfig(model_name=MODEL_NAME, adapters=ADAPTERS))
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture()
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield http


def complete(client: httpx.Client, model: str, prompt: str = "The capital of France is") -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return str(response.json()["choices"][0]["text"])


def test_models_lists_adapters_with_the_base_as_parent(client: httpx.Client) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert list(cards) == [MODEL_NAME, *ADAPTERS]
    assert cards[MODEL_NAME]["parent"] is None
    assert all(cards[name]["parent"] == MODEL_NAME for name in ADAPTERS)


def test_model_name_picks_the_adapter_and_concurrent_requests_keep_their_own(client: httpx.Client) -> None:
    alone = {model: complete(client, model) for model in (MODEL_NAME, *ADAPTERS)}
    assert len(set(alone.values())) == 3, alone  # each adapter changes the greedy answer
    with ThreadPoolExecutor(6) as pool:  # the engine batches them together
        models = [MODEL_NAME, *ADAPTERS] * 2
        together = list(pool.map(lambda m: complete(client, m), models))
    assert together == [alone[m] for m in models]


def test_chat_route_uses_the_adapter_too(client: httpx.Client) -> None:
    def first_logprob(model: str) -> Any:
        messages = [{"role": "user", "content": "Hi!"}]
        body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        return response.json()["choices"][0]["logprobs"]["content"][0]["logprob"]

    # SmolLM2 greets with near certainty either way: the adapter shows in the probabilities
    assert abs(first_logprob("terse") - first_logprob(MODEL_NAME)) > 1e-3


def test_messages_and_responses_routes_report_the_adapter(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Hi!"}]
    body = {"model": "wordy", "max_tokens": 2, "messages": messages, "temperature": 0}
    response = client.post("/v1/messages", json=body)
    assert response.status_code == 200 and response.json()["model"] == "wordy", response.text
    body = {"model": "wordy", "max_output_tokens": 2, "input": "Hi!", "temperature": 0}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200 and response.json()["model"] == "wordy", response.text


def test_unknown_model_is_a_404_and_adapter_embeddings_a_400(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "`terse`" in response.json()["error"]["message"]
    response = client.post("/v1/embeddings", json={"model": "terse", "input": "hi"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


def test_cli_flags_reach_both_configs() -> None:
    args = build_parser().parse_args(
        ["serve", "api_server", "--adapters", "a=/x", "b=/y", "--model-name", "m"]
    )
    assert engine_config_from_args(args).adapters == {"a": "/x", "b": "/y"}
    assert serve_config_from_args(args).adapters == ("a", "b")
    args = build_parser().parse_args(["serve", "api_server", "--adapters", "m=/x", "--model-name", "m"])
    with pytest.raises(ValueError, match="rename the adapter"):
        serve_config_from_args(args)
