"""/v1/messages and /v1/messages/count_tokens driven by the official anthropic client, against /v1/chat/completions."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from conftest import API_KEY, MODEL_NAME, RunningServer

SYSTEM = "You are a terse assistant."
# this client release no longer lists the sampling fields; the Messages API (and this server) still takes them
GREEDY = {"temperature": 0}
QUESTION = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def claude(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)


def chat_greedy(client: httpx.Client, max_tokens: int, stop: list[str] | None = None) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if stop:
        body["stop"] = stop
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_message_equals_chat_completions(claude: anthropic.Anthropic, client: httpx.Client) -> None:
    message = claude.messages.create(
        model=MODEL_NAME,
        max_tokens=12,
        system=SYSTEM,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        extra_body=GREEDY,
    )
    chat = chat_greedy(client, 12)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == chat["choices"][0]["message"]["content"]
    assert message.stop_reason == "max_tokens"
    assert message.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert message.usage.output_tokens == chat["usage"]["completion_tokens"] == 12


def test_streamed_events_give_the_same_text(claude: anthropic.Anthropic, client: httpx.Client) -> None:
    kwargs = {"model": MODEL_NAME, "max_tokens": 12, "system": SYSTEM, "extra_body": GREEDY}
    with claude.messages.stream(messages=[{"role": "user", "content": QUESTION}], **kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    for kind in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta"):
        assert kind in kinds
    assert final.content[0].text == chat_greedy(client, 12)["choices"][0]["message"]["content"]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12


def test_stop_sequence_is_reported(claude: anthropic.Anthropic, client: httpx.Client) -> None:
    full = chat_greedy(client, 12)["choices"][0]["message"]["content"]
    word = full.split()[1]  # a word the greedy answer reaches
    message = claude.messages.create(
        model=MODEL_NAME,
        max_tokens=12,
        system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body=GREEDY,
        stop_sequences=["zzzz-never", word],
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert message.content[0].text == full[: full.index(word)]


def test_top_k_and_top_p_reach_sampling(claude: anthropic.Anthropic) -> None:
    # top_k 1 keeps only the most likely token: sampling at temperature 1 is greedy
    greedy = claude.messages.create(
        model=MODEL_NAME, max_tokens=8, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
    )
    top_one = claude.messages.create(
        model=MODEL_NAME,
        max_tokens=8,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"temperature": 1.0, "top_k": 1, "top_p": 0.9},
    )
    assert top_one.content[0].text == greedy.content[0].text


def test_count_tokens_equals_the_prompt_of_a_message(
    claude: anthropic.Anthropic, client: httpx.Client
) -> None:
    counted = claude.messages.count_tokens(
        model=MODEL_NAME, system=SYSTEM, messages=[{"role": "user", "content": QUESTION}]
    )
    assert counted.input_tokens == chat_greedy(client, 1)["usage"]["prompt_tokens"]


def test_errors_have_anthropics_shape(claude: anthropic.Anthropic, client: httpx.Client) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model=MODEL_NAME, max_tokens=0, messages=[{"role": "user", "content": QUESTION}]
        )
    assert "max_tokens" in str(caught.value)
    missing = client.post(
        "/v1/messages", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}]}
    )
    assert missing.status_code == 400
    body = missing.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("max_tokens")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError, match="'image' are not supported"):
        claude.messages.create(
            model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": [image]}]
        )
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    long_prompt = "word " * 10_000
    with pytest.raises(anthropic.BadRequestError, match="maximum context length"):
        claude.messages.create(
            model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": long_prompt}]
        )


def test_x_api_key_is_accepted_with_api_keys(keyed_server: RunningServer) -> None:
    good = anthropic.Anthropic(base_url=keyed_server.base_url, api_key=API_KEY, max_retries=0)
    message = good.messages.create(
        model=MODEL_NAME, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.output_tokens >= 1
    bad = anthropic.Anthropic(base_url=keyed_server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=MODEL_NAME, max_tokens=2, messages=[{"role": "user", "content": "hi"}])


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER_SCHEMA}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.slow  # a grammar compile and two 60-token runs: ~40 s on the 2-core CPU
def test_named_tool_gives_a_tool_use_block_streamed_and_not(claude: anthropic.Anthropic) -> None:
    request = {
        "model": MODEL_NAME,
        "max_tokens": 60,
        "messages": WEATHER_QUESTION,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": GREEDY,
    }
    message = claude.messages.create(**request)
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER_SCHEMA)
    assert message.stop_reason == "tool_use"
    with claude.messages.stream(**request) as stream:
        streamed = stream.get_final_message()
    streamed_uses = [block for block in streamed.content if block.type == "tool_use"]
    assert [(u.name, u.input) for u in streamed_uses] == [(uses[0].name, uses[0].input)]
    assert streamed.stop_reason == "tool_use"


def test_tool_result_turn_renders_like_chat_tool_messages(
    claude: anthropic.Anthropic, client: httpx.Client
) -> None:
    call_input = {"city": "Paris", "unit": "celsius"}
    conversation = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": call_input}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 degrees, sunny"}],
        },
    ]
    message = claude.messages.create(
        model=MODEL_NAME, max_tokens=8, messages=conversation, tools=[WEATHER_TOOL], extra_body=GREEDY
    )
    chat_messages = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(call_input)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 degrees, sunny"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER_SCHEMA,
            },
        }
    ]
    body = {"model": MODEL_NAME, "messages": chat_messages, "tools": tools, "max_tokens": 8, "temperature": 0}
    chat = client.post("/v1/chat/completions", json=body).json()
    assert message.usage.input_tokens == chat["usage"]["prompt_tokens"]
    text = "".join(block.text for block in message.content if block.type == "text")
    assert text == (chat["choices"][0]["message"]["content"] or "")
