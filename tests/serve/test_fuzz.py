"""Seeded fuzz of the request bodies: whatever a client sends, the server answers < 500 and keeps serving."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fake_engine import GREEDY_TEXT, FakeEngine
from fastapi.testclient import TestClient

from lmserve.config import ServeConfig
from lmserve.serve.app import create_app

HI = [{"role": "user", "content": "hi"}]
BASE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": HI, "max_tokens": 2, "temperature": 0},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2, "temperature": 0},
    "/v1/encode": {"input": "hi"},
    "/abort_request": {"request_id": "chatcmpl-none"},
}
# fields the routes read, so mutations reach validation and the handlers rather than being ignored
FIELDS = {
    "/v1/chat/completions": [
        "messages",
        "model",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "top_k",
        "min_p",
        "min_tokens",
        "min_new_tokens",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "chat_template_kwargs",
        "tools",
        "tool_choice",
        "response_format",
        "parallel_tool_calls",
        "ignore_eos",
        "user",
        "skip_special_tokens",
    ],  # fmt: skip
    "/v1/completions": [
        "prompt",
        "model",
        "temperature",
        "max_tokens",
        "n",
        "stop",
        "stream",
        "echo",
        "logprobs",
        "best_of",
        "suffix",
        "seed",
        "logit_bias",
        "min_tokens",
        "repetition_penalty",
        "top_k",
    ],  # fmt: skip
    "/v1/encode": ["input", "do_preprocess", "add_bos"],
    "/abort_request": ["request_id", "abort_all"],
}
# raw JSON text that json.dumps cannot write: 1e400 parses to inf, CESU-8 bytes to a lone surrogate
RAW_VALUES = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1" * 5000,
    b'"\xed\xa0\x80"',
    b'"a\xed\xb0\x80b"',
    b"[" * 10_000 + b"]" * 10_000,
    b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
]
PLAIN_VALUES: list[Any] = [
    None, True, False, "yes", "true", "", "1", 0, 1, -1, 3, 2**31, 2**63, 2**64, -(2**64), 10**30,
    0.5, -0.5, 2.5, 1e30, -1e30, 1e-300, "\ud800", "\udfff", "ok\ud83d", "x" * 100_000, [], [None],
    ["\ud800"], [1, "a"], [[1]], [[-1]], {}, {"a": "\ud800"}, {"\ud800": 1}, {"1": 1e30},
    {"-1": 1}, {"99999999999999999999999": 1}, {"type": "text"}, [{"role": "user"}],
    [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": [{"type": "text", "text": 1}]}],
]  # fmt: skip
NON_OBJECT_BODIES = [b"", b"[]", b"1", b'"x"', b"null", b"true", b"{", b"\xff\xfe", b"[" * 10_000]


class Raw:
    """A value written into the JSON text as-is."""

    def __init__(self, text: bytes) -> None:
        self.text = text


def dumps(body: Any) -> bytes:
    """json.dumps, with Raw values spliced in as raw bytes through placeholder strings."""
    raws: list[bytes] = []

    def placeholder(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"__raw{len(raws) - 1}__"
        if isinstance(value, dict):
            return {key: placeholder(item) for key, item in value.items()}
        if isinstance(value, list):
            return [placeholder(item) for item in value]
        return value

    text = json.dumps(placeholder(body)).encode()
    for i, raw in enumerate(raws):
        text = text.replace(f'"__raw{i}__"'.encode(), raw)
    return text


def nasty_value(rng: random.Random) -> Any:
    if rng.random() < 0.3:
        return Raw(rng.choice(RAW_VALUES))
    return rng.choice(PLAIN_VALUES)


def mutate(
    body: dict[str, Any], fields: list[str], rng: random.Random, keep: tuple[str, ...]
) -> dict[str, Any]:
    """1-3 changes: a field set to a nasty value, a field dropped, or a nasty value inside a message.

    Fields in `keep` are left as they are.
    """
    body = dict(body)
    fields = [name for name in fields if name not in keep]
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        droppable = [name for name in body if name not in keep]
        if kind < 0.15 and droppable:
            del body[rng.choice(droppable)]
        elif kind < 0.3 and "messages" in body:
            body["messages"] = [
                {"role": rng.choice(["user", "system", "bot", 1]), "content": nasty_value(rng)}
            ]
        else:
            body[rng.choice(fields)] = nasty_value(rng)
    return body


def fuzz_cases(seed: int, count: int, keep: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    """(path, raw body) pairs: mostly mutated valid bodies, some bodies that are no JSON object."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        path = rng.choice(list(BASE_BODIES))
        if rng.random() < 0.08:
            cases.append((path, rng.choice(NON_OBJECT_BODIES)))
        else:
            cases.append((path, dumps(mutate(BASE_BODIES[path], FIELDS[path], rng, keep))))
    return cases


def check_answer(status: int, text: str, case: str) -> None:
    """< 500, an OpenAI error body for a 4xx, no error event inside a 200 stream."""
    assert status < 500, f"{status} for {case}: {text[:300]}"
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], case
        assert error["type"] == "invalid_request_error" or status in (401, 404), case
    elif text.startswith("data:"):
        assert '"error"' not in text, f"error event in the stream of {case}: {text[-300:]}"


def run_fuzz(post: Callable[[str, bytes], tuple[int, str]], cases: list[tuple[str, bytes]]) -> None:
    for path, body in cases:
        status, text = post(path, body)
        check_answer(status, text, f"{path} {body[:200]!r}")


@pytest.fixture()
def fake_client() -> TestClient:
    return TestClient(create_app(FakeEngine(step_seconds=0), ServeConfig(model_name="m")))


def test_fuzzed_bodies_never_get_a_5xx_from_the_fake_engine_app(fake_client: TestClient) -> None:
    def post(path: str, body: bytes) -> tuple[int, str]:
        response = fake_client.post(path, content=body, headers={"content-type": "application/json"})
        return response.status_code, response.text

    run_fuzz(post, fuzz_cases(seed=20240607, count=400))
    answer = fake_client.post(
        "/v1/chat/completions", json={"messages": HI, "max_tokens": 5, "temperature": 0}
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == GREEDY_TEXT[:5]


def test_fuzz_cases_are_reproducible_and_varied() -> None:
    cases = fuzz_cases(seed=7, count=200)
    assert cases == fuzz_cases(seed=7, count=200)
    assert {path for path, _ in cases} == set(BASE_BODIES)
    assert len({body for _, body in cases}) > 150
    assert any(b"NaN" in body for _, body in cases) and any(b"\\ud800" in body for _, body in cases)


def test_fuzzed_bodies_never_get_a_5xx_from_the_real_engine_app(client: httpx.Client) -> None:
    def post(path: str, body: bytes) -> tuple[int, str]:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        return response.status_code, response.text

    # max_tokens stays as it is: without it a chat request runs to the end of SmolLM2's context on CPU
    run_fuzz(post, fuzz_cases(seed=99, count=40, keep=("max_tokens", "max_completion_tokens")))
    assert client.get("/health").status_code == 200
    answer = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
