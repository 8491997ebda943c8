"""/v1/responses (stateless) driven by the official openai client, against /v1/chat/completions."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL_NAME, RunningServer

INSTRUCTIONS = "You are a terse assistant."
QUESTION = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def oai(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def chat_greedy(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_response_equals_chat_completions(oai: openai.OpenAI, client: httpx.Client) -> None:
    response = oai.responses.create(
        model=MODEL_NAME, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=10, temperature=0
    )
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    chat = chat_greedy(client, messages, 10)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert (
        response.usage.output_tokens == 10 and response.usage.total_tokens == response.usage.input_tokens + 10
    )


def test_message_items_and_streaming(oai: openai.OpenAI, client: httpx.Client) -> None:
    conversation = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello. How can I help?"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    stream = oai.responses.create(
        model=MODEL_NAME, input=conversation, max_output_tokens=10, temperature=0, stream=True
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done"):
        assert kind in kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    chat_messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": QUESTION},
    ]
    assert text == chat_greedy(client, chat_messages, 10)["choices"][0]["message"]["content"]
    assert events[-1].response.output_text == text


def test_a_finished_answer_is_completed(oai: openai.OpenAI) -> None:
    # SmolLM2 answers this in 3 tokens ("No.") and stops
    question = "Reply with one word: yes or no. Is water wet?"
    with oai.responses.stream(
        model=MODEL_NAME, input=question, max_output_tokens=20, temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output[0].content[0].text == final.output_text and final.usage.output_tokens < 20


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"input": [{"type": "input_image", "image_url": "http://x"}]}, "input.0.type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_stateful_and_unsupported_fields_are_400(oai: openai.OpenAI, fields: dict, param: str) -> None:
    request = {"model": MODEL_NAME, "input": QUESTION, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(**request)
    assert caught.value.body["param"] == param  # type: ignore[index]


def test_prompt_past_the_context_is_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oai.responses.create(model=MODEL_NAME, input="word " * 10_000)


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": WEATHER_SCHEMA,
}
WEATHER_QUESTION = "What is the weather in Paris?"


@pytest.mark.slow  # a grammar compile and two 60-token runs: ~40 s on the 2-core CPU
def test_named_function_is_a_function_call_item_streamed_and_not(oai: openai.OpenAI) -> None:
    request = {
        "model": MODEL_NAME,
        "input": WEATHER_QUESTION,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 60,
        "temperature": 0,
    }
    response = oai.responses.create(**request)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_SCHEMA)
    events = list(oai.responses.create(**request, stream=True))
    done = [
        e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"
    ]
    assert [(c.name, c.arguments) for c in done] == [(calls[0].name, calls[0].arguments)]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == calls[0].arguments and events[-1].type == "response.completed"


def test_function_call_output_renders_like_chat_tool_messages(
    oai: openai.OpenAI, client: httpx.Client
) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    conversation = [
        {"role": "user", "content": WEATHER_QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": arguments},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees, sunny"},
    ]
    response = oai.responses.create(
        model=MODEL_NAME, input=conversation, tools=[WEATHER_TOOL], max_output_tokens=1
    )
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    chat_messages = [
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    tool = {
        "type": "function",
        "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
    }
    body = {"model": MODEL_NAME, "messages": chat_messages, "tools": [tool], "max_tokens": 1}
    chat = client.post("/v1/chat/completions", json=body).json()
    assert response.usage.input_tokens == chat["usage"]["prompt_tokens"]


def test_text_format_json_schema_output_validates(oai: openai.OpenAI) -> None:
    text_format = {"type": "json_schema", "name": "weather", "schema": WEATHER_SCHEMA, "strict": True}
    response = oai.responses.create(
        model=MODEL_NAME,
        input=WEATHER_QUESTION,
        text={"format": text_format},
        max_output_tokens=60,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), WEATHER_SCHEMA)
