"""Bad input is a 400 naming the field; a 500 tells the client only a request id (fake engine)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from lmserve.config import ServeConfig
from lmserve.generation import GenerationConfig, RequestOutput
from lmserve.serve.app import create_app
from lmserve.serve.protocol import ChatCompletionRequest
from lmserve.serve.sampling import chat_messages

HI = [{"role": "user", "content": "hi"}]
SECRET = "/srv/secret/path.py line 42"


def make_client(engine: FakeEngine | None = None) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine(step_seconds=0)
    app = create_app(engine, ServeConfig(model_name="m"))
    return TestClient(app, raise_server_exceptions=False), engine


def post_raw(client: TestClient, path: str, body: bytes) -> Any:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def error_of(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
NAMED_ELSEWHERE = {"type": "function", "function": {"name": "not_listed"}}
CHAT_400: list[tuple[bytes, str]] = [
    (json.dumps({"messages": HI, "model": "\ud800"}).encode(), "model"),
    (json.dumps({"messages": [{"role": "user", "content": "a\ud800"}]}).encode(), "messages.0.content"),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}
        ).encode(),
        "messages.0.content.0.text",
    ),
    (json.dumps({"messages": HI, "stop": ["ok", "\ud800"]}).encode(), "stop"),
    (
        json.dumps({"messages": HI, "chat_template_kwargs": {"k": ["\ud800"]}}).encode(),
        "chat_template_kwargs",
    ),
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "messages.0.content"),  # CESU-8
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages.0.content"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}',
        "repetition_penalty",
    ),
    (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e400}', "repetition_penalty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', "top_p"),
    (json.dumps({"messages": HI, "repetition_penalty": 1e30}).encode(), "repetition_penalty"),
    (json.dumps({"messages": HI, "seed": 2**64}).encode(), "seed"),
    (json.dumps({"messages": HI, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"messages": HI, "logprobs": 1}).encode(), "logprobs"),
    (json.dumps({"messages": HI, "max_tokens": "5"}).encode(), "max_tokens"),
    (
        json.dumps({"messages": HI, "tools": [WEATHER_TOOL], "tool_choice": NAMED_ELSEWHERE}).encode(),
        "tool_choice.function.name",
    ),
    (
        json.dumps(
            {
                "messages": HI,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
            }
        ).encode(),
        "tools.0.function.parameters",
    ),
    (
        json.dumps(
            {"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}
        ).encode(),
        "tools.0.function.parameters",
    ),
    (
        json.dumps(
            {
                "messages": HI,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "wat"}},
                },
            }
        ).encode(),
        "response_format",
    ),
    (json.dumps({"messages": HI, "response_format": {"type": "yaml"}}).encode(), "response_format.type"),
    (json.dumps({"messages": HI, "structured_outputs": {"regex": "a(b"}}).encode(), "structured_outputs"),
    (
        json.dumps({"messages": HI, "structured_outputs": {"grammar": "root ::= undefined_rule"}}).encode(),
        "structured_outputs",
    ),
    (
        json.dumps({"messages": HI, "structured_outputs": {"regex": "a", "choice": ["b"]}}).encode(),
        "structured_outputs",
    ),
    (json.dumps({"messages": HI, "regex_schema": "[a-"}).encode(), "regex_schema"),
    (json.dumps({"messages": HI, "tool_choice": "required"}).encode(), "tool_choice"),
    (json.dumps({"messages": HI, "min_tokens": 2, "min_new_tokens": 3}).encode(), "min_tokens"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_400)
def test_bad_chat_fields_are_400_naming_the_field(body: bytes, param: str) -> None:
    client, engine = make_client()
    error = error_of(post_raw(client, "/v1/chat/completions", body))
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not engine.configs  # nothing reached the engine


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "x\udfff"]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "echo": "true"}, "echo"),
        ("/v1/encode", {"input": ["\ud800"]}, "input"),
        ("/v1/encode", {"input": "hi", "do_preprocess": "yes"}, "do_preprocess"),
        ("/abort_request", {"request_id": "\ud800"}, "request_id"),
        ("/abort_request", {"request_id": 5}, "request_id"),
    ],
)
def test_bad_fields_of_other_routes_are_400(path: str, body: dict[str, Any], param: str) -> None:
    client, _ = make_client()
    assert error_of(post_raw(client, path, json.dumps(body).encode()))["param"] == param


def test_abort_all_takes_only_a_real_boolean() -> None:
    client, engine = make_client()
    engine.running.add("chatcmpl-x-0")
    client.app.state.lmserve.in_flight.add("chatcmpl-x", ["chatcmpl-x-0"])  # type: ignore[attr-defined]
    assert error_of(client.post("/abort_request", json={"abort_all": "yes"}))["param"] == "abort_all"
    assert not engine.aborted
    assert client.post("/abort_request", json={"abort_all": True}).json() == {"aborted": ["chatcmpl-x"]}
    assert engine.aborted == {"chatcmpl-x-0"}


def test_min_tokens_is_min_new_tokens() -> None:
    client, engine = make_client()
    for body in ({"min_tokens": 3}, {"min_new_tokens": 3}, {"min_tokens": 3, "min_new_tokens": 3}):
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body})
        assert response.status_code == 200, response.text
        assert engine.configs[-1].min_new_tokens == 3
    client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4, "min_tokens": 2})
    assert engine.configs[-1].min_new_tokens == 2


def test_logit_bias_reaches_the_generation_config_as_int_keys() -> None:
    client, engine = make_client()
    body = {"messages": HI, "max_tokens": 2, "logit_bias": {"104": 5, "0": -100, "256": 100.0}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert engine.configs[-1].logit_bias == {104: 5.0, 0: -100.0, 256: 100.0}
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logit_bias": {"7": 1}})
    assert engine.configs[-1].logit_bias == {7: 1.0}
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert engine.configs[-1].logit_bias is None


@pytest.mark.parametrize(
    "biases",
    [{"a": 1}, {"1.5": 1}, {" 1": 1}, {"-1": 1}, {"257": 1}, {"9" * 30: 1}, {"1": 100.5}, {"1": -101}],
)
def test_bad_logit_bias_is_400_naming_logit_bias(biases: dict[str, float]) -> None:
    client, engine = make_client()  # the byte tokenizer's vocab_size is 257
    for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "hi"})):
        error = error_of(client.post(path, json={**body, "logit_bias": biases}))
        assert error["param"] == "logit_bias" and "logit_bias" in error["message"]
    assert not engine.configs


def test_parallel_tool_calls_default_is_accepted() -> None:
    client, _ = make_client()
    body = {"messages": HI, "max_tokens": 2, "parallel_tool_calls": True}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_message_name_goes_to_the_template() -> None:
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "a", "name": "ann"}]}
    )
    assert chat_messages(body.messages) == [{"role": "user", "content": "a", "name": "ann"}]


class FailingEngine(FakeEngine):
    """Fails in the way chosen: an exception from generate, or an output that carries an engine error."""

    def __init__(self, how: str) -> None:
        super().__init__(step_seconds=0)
        self.how = how

    async def generate(
        self, prompt_token_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        if self.how == "raise":
            raise RuntimeError(SECRET)
        yield RequestOutput(request_id or "r", finished=True, finish_reason="error", error=SECRET)


def request_id_of(message: str) -> str:
    assert message.startswith("internal error (request id ") and SECRET not in message, message
    return message.split("request id ", 1)[1].split(")", 1)[0]


@pytest.mark.parametrize("how", ["raise", "error output"])
def test_500_says_internal_error_and_a_request_id_and_logs_the_failure(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = make_client(FailingEngine(how))
    with caplog.at_level(logging.ERROR, logger="lmserve.serve"):
        error = error_of(client.post("/v1/chat/completions", json={"messages": HI}), 500)
    request_id = request_id_of(error["message"])
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and (SECRET in logged[0].getMessage() or SECRET in str(logged[0].exc_info))
    if how == "raise":
        assert logged[0].exc_info is not None  # the traceback is in the log


@pytest.mark.parametrize("how", ["raise", "error output"])
def test_mid_stream_error_event_hides_the_failure(how: str, caplog: pytest.LogCaptureFixture) -> None:
    client, _ = make_client(FailingEngine(how))
    with caplog.at_level(logging.ERROR, logger="lmserve.serve"):
        response = client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "internal_server_error"
    request_id = request_id_of(error["message"])
    assert request_id.startswith("cmpl-")  # the id of the stream the client is reading
    assert any(request_id in r.getMessage() for r in caplog.records)
