"""HTTP layer without a model: request → GenerationConfig mapping, error mapping, guard rules (fake engine)."""

from __future__ import annotations

import pytest
from fake_engine import GREEDY_TEXT, FakeEngine
from fastapi.testclient import TestClient

from lmserve.config import ServeConfig
from lmserve.generation import GenerationConfig
from lmserve.serve.app import create_app
from lmserve.serve.errors import APIError, validation_message
from lmserve.serve.guard import key_matches, needs_key
from lmserve.serve.protocol import ChatCompletionRequest
from lmserve.serve.sampling import build_generation_config, chat_messages, check_context

HI = [{"role": "user", "content": "hi"}]


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HI, **fields})


def test_openai_names_map_to_lmserve_names() -> None:
    body = request(
        temperature=0.5, top_p=0.9, top_k=5, seed=3, stop="x", frequency_penalty=0.5, min_new_tokens=2
    )
    config = build_generation_config(body, GenerationConfig(), 7, 2, vocab_size=257)
    assert (config.max_new_tokens, config.do_sample, config.temperature) == (7, True, 0.5)
    assert (config.top_p, config.top_k, config.random_seed, config.stop_words) == (0.9, 5, 3, ("x",))
    assert (config.frequency_penalty, config.min_new_tokens, config.logprobs) == (0.5, 2, 2)


def test_temperature_zero_is_greedy_and_unset_fields_use_model_defaults() -> None:
    defaults = GenerationConfig(temperature=0.6, top_p=0.8, repetition_penalty=1.1)
    greedy = build_generation_config(request(temperature=0), defaults, None, None, vocab_size=257)
    assert greedy.greedy and greedy.max_new_tokens is None
    unset = build_generation_config(request(), defaults, None, None, vocab_size=257)
    assert (unset.temperature, unset.top_p, unset.repetition_penalty, unset.do_sample) == (
        0.6,
        0.8,
        1.1,
        True,
    )


def test_seeded_choices_get_seed_plus_index() -> None:
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], n=3, seed=10, temperature=1.0
    )
    config = build_generation_config(request, GenerationConfig(), None, None, 257)
    assert [c.random_seed for c in config.fan_out()] == [10, 11, 12]
    unseeded = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=3)
    assert {
        c.random_seed
        for c in build_generation_config(unseeded, GenerationConfig(), None, None, 257).fan_out()
    } == {None}


def test_chat_messages_text_parts_and_rejections() -> None:
    body = request(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    )
    assert chat_messages(body.messages) == [{"role": "system", "content": "ab"}]
    image = request(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(APIError) as caught:
        chat_messages(image.messages)
    assert caught.value.param == "messages.0.content.0.type"


def test_context_check_names_the_limit() -> None:
    check_context(10, 10, 20, "messages")
    with pytest.raises(APIError) as caught:
        check_context(10, 11, 20, "messages")
    assert caught.value.code == "context_length_exceeded" and "20" in caught.value.message


def test_validation_message_names_the_field() -> None:
    message, param = validation_message(
        {"loc": ("body", "messages", 0, "role"), "msg": "bad role", "type": "x"}
    )
    assert (message, param) == ("messages.0.role: bad role", "messages.0.role")


def test_api_key_rules() -> None:
    assert key_matches("Bearer k2", ("k1", "k2")) and not key_matches("Bearer k3", ("k1",))
    assert not key_matches(None, ("k1",)) and not key_matches("k1", ("k1",))
    assert not needs_key("/health") and not needs_key("/static/swagger-ui.css") and not needs_key("/chat/")
    assert needs_key("/v1/models") and needs_key("/metrics") and needs_key("/abort_request")


@pytest.fixture()
def fake() -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine()
    return TestClient(create_app(engine, ServeConfig(model_name="m"))), engine


def test_fake_chat_roundtrip_and_health(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    data = client.post(
        "/v1/chat/completions", json={"messages": HI, "max_tokens": 5, "temperature": 0}
    ).json()
    assert data["choices"][0]["message"]["content"] == GREEDY_TEXT[:5]
    assert engine.configs[-1].max_new_tokens == 5 and not engine.configs[-1].do_sample
    engine.alive = False
    assert client.get("/health").status_code == 503


def test_form_encoded_json_is_accepted(fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    body = b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}'
    response = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200, response.text


def test_completion_prompt_too_long_is_400(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    long_prompt = "x" * 300
    client.app.state.lmserve.engine.session_len = 256  # type: ignore[attr-defined]
    response = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": None})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
