"""Tool calls and structured output through the real server (SmolLM2, engine-core process), read by the
official openai client; arguments checked with jsonschema against the tools' own schemas."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.serve.conftest import MODEL_NAME, RunningServer

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 20}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME_PARAMETERS},
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
NO_TOOL_NEEDED = [{"role": "user", "content": "Tell me a short joke about cats."}]


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=300)


def check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_parse_even_when_no_tool_is_asked_for(server: RunningServer) -> None:
    completion = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=NO_TOOL_NEEDED,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        n=2,
        temperature=1.0,
        seed=3,
    )
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        check_calls(choice.message.tool_calls or [], set(SCHEMAS))


def test_named_function_is_the_one_called_once(server: RunningServer) -> None:
    completion = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
    )
    calls = completion.choices[0].message.tool_calls or []
    assert len(calls) == 1 and completion.choices[0].finish_reason == "tool_calls"
    check_calls(calls, {"get_time"})


def test_openai_client_reassembles_streamed_calls(server: RunningServer) -> None:
    with client(server).chat.completions.stream(
        model=MODEL_NAME, messages=NO_TOOL_NEEDED, tools=TOOLS, tool_choice="required", max_tokens=60
    ) as stream:
        argument_deltas = sum(1 for event in stream if event.type == "tool_calls.function.arguments.delta")
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls or [], set(SCHEMAS))
    assert argument_deltas > 1  # fragments, not one piece at the end


def test_tool_history_renders_and_auto_answers(server: RunningServer) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]
    completion = client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=16
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


def test_json_schema_streamed_with_n3_each_validates(server: RunningServer) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Describe the weather in a city."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": WEATHER_PARAMETERS, "strict": True},
        },
        "max_tokens": 40,
        "n": 3,
        "temperature": 1.0,
        "seed": 11,
        "stream": True,
    }
    texts = ["", "", ""]
    reasons: list[str | None] = [None, None, None]
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
                reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert reasons == ["stop"] * 3, texts
    for text in texts:
        jsonschema.validate(json.loads(text), WEATHER_PARAMETERS)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, {"red", "green", "blue"}),
        ({"regex_schema": "(red|green|blue)"}, {"red", "green", "blue"}),
    ],
)
def test_choice_and_regex_schema_over_http(
    server: RunningServer, field: dict[str, Any], expected: set[str]
) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Name a color."}],
        "max_tokens": 8,
        **field,
    }
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] in expected


def test_completions_take_structured_outputs(server: RunningServer) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": "My favourite number is",
        "max_tokens": 8,
        "structured_outputs": {"regex": " [0-9]{2}"},
    }
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert re.fullmatch(" [0-9]{2}", choice["text"]) and choice["finish_reason"] == "stop"
