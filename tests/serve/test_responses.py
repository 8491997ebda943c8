"""/v1/responses (stateless) driven by the official openai client, against /v1/chat/completions."""

from __future__ import annotations

import httpx
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
    with oai.responses.stream(
        model=MODEL_NAME, input="Say yes.", max_output_tokens=200, temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output[0].content[0].text == final.output_text and final.usage.output_tokens < 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input.0.type"),
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
