"""OpenAI's Responses API, the stateless subset: POST /v1/responses (JSON and its SSE events) over the chat path.

Nothing is stored: previous_response_id, background and store=true are refused with a 400 naming the field.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field

from lmserve.serve import formatting as fmt
from lmserve.serve.chat_bridge import (
    PreparedChat,
    chat_outputs,
    collect_chat,
    event_stream,
    final_turn,
    prepare_chat,
)
from lmserve.serve.errors import APIError, error_body, internal_error
from lmserve.serve.protocol import ChatCompletionRequest, ErrorResponse, RequestModel, random_id
from lmserve.serve.state import ServerState, get_state
from lmserve.serve.streams import unless_disconnected

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500)}
_TEXT_PARTS = ("input_text", "output_text", "text")


class InputPart(RequestModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class InputItem(RequestModel):
    """A message item (`type` "message" or left out); function-call items come with tool calling."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Union[str, list[InputPart], None] = None


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: Union[str, list[InputItem]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
    # the stored API's fields (and what we lack) are refused, never dropped, in _check_supported
    previous_response_id: str | None = None
    background: bool | None = None
    store: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    conversation: Any = None
    prompt: Any = None


@router.post("/v1/responses", responses=_ERRORS)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """One model turn; `stream: true` sends the Responses events (response.created ... response.completed)."""
    state = get_state(request)
    _check_supported(body)
    prepared = prepare_chat(state, _chat_request(body))
    api_id = random_id("resp_")
    if body.stream:
        return event_stream(state, request, api_id, _events(state, api_id, body, prepared))
    choice = await unless_disconnected(request, collect_chat(state, api_id, prepared.submission))
    return JSONResponse(_response(state, api_id, body, _output_items(api_id, prepared, choice), choice))


def _check_supported(body: ResponsesRequest) -> None:
    refused = {
        "previous_response_id": "this server keeps no responses; send the whole conversation as `input`",
        "conversation": "this server keeps no conversations; send the whole conversation as `input`",
        "prompt": "stored prompts are not supported; send the text as `input`",
    }
    for name, reason in refused.items():
        if getattr(body, name):
            raise APIError(400, f"{name}: {reason}", name)
    if body.background:
        raise APIError(
            400, "background: responses run in the foreground only (nothing is stored)", "background"
        )
    if body.store:
        raise APIError(
            400, "store: this server is stateless and stores no responses; send store: false", "store"
        )
    if (body.reasoning or {}).get("effort") is not None:
        raise APIError(400, "reasoning: reasoning effort is not supported by this server", "reasoning")
    if body.include:
        raise APIError(400, f"include: {body.include} are not supported; leave include empty", "include")
    if body.top_logprobs:
        raise APIError(400, "top_logprobs: logprobs are not supported on /v1/responses", "top_logprobs")
    if body.truncation == "auto":
        raise APIError(
            400, "truncation 'auto' is not supported; a prompt past the context is a 400", "truncation"
        )


def _chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """instructions as the system turn, the input items as chat messages, tools and text.format as chat's."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        for i, item in enumerate(body.input):
            _add_item(messages, item, f"input.{i}")
    if not messages:
        raise APIError(400, "input must hold at least one message", "input")
    fields: dict[str, Any] = {"model": body.model, "messages": messages}
    optional = {
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "user": body.user,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body.text),
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    if body.tools:
        fields["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        fields["tool_choice"] = _chat_tool_choice(body.tool_choice)
    return ChatCompletionRequest.model_validate(fields)


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format (flat: {type, name, schema, strict}) as chat's response_format ({type, json_schema: {...}})."""
    text_format = (text or {}).get("format")
    if not isinstance(text_format, dict) or text_format.get("type") in (None, "text"):
        return None
    if text_format.get("type") == "json_schema":
        schema = {k: text_format[k] for k in ("name", "schema", "strict", "description") if k in text_format}
        return {"type": "json_schema", "json_schema": schema}
    if text_format.get("type") == "json_object":
        return {"type": "json_object"}
    message = (
        f"text.format type {text_format.get('type')!r} must be one of 'text', 'json_schema', 'json_object'"
    )
    raise APIError(400, message, "text.format")


def _chat_tool(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise APIError(
            400, f"tools.{index}.type {kind!r}: only function tools are supported", f"tools.{index}.type"
        )
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    """Responses' flat {"type": "function", "name"} as chat's nested one; the strings are the same."""
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _add_item(messages: list[dict[str, Any]], item: InputItem, param: str) -> None:
    """A message item, or a function call (joined to the assistant turn before it) or its output."""
    extra = item.model_extra or {}
    if item.type == "function_call":
        call = {"id": extra.get("call_id"), "type": "function"}
        call["function"] = {"name": extra.get("name"), "arguments": extra.get("arguments")}
        if not all(isinstance(v, str) for v in (call["id"], extra.get("name"), extra.get("arguments"))):
            raise APIError(400, f"{param}: a function_call needs call_id, name and arguments", param)
        if not (messages and messages[-1]["role"] == "assistant"):
            messages.append({"role": "assistant", "content": ""})
        messages[-1].setdefault("tool_calls", []).append(call)
    elif item.type == "function_call_output":
        output = extra.get("output")
        if not isinstance(extra.get("call_id"), str) or not isinstance(output, str):
            raise APIError(400, f"{param}: a function_call_output needs call_id and output (text)", param)
        messages.append({"role": "tool", "tool_call_id": extra["call_id"], "content": output})
    else:
        messages.append(_message(item, param))


def _message(item: InputItem, param: str) -> dict[str, str]:
    if item.type != "message" or item.role is None:
        message = (
            f"{param}.type: input items of type {item.type!r} are not supported; only message, function_call"
        )
        raise APIError(400, message + " and function_call_output", f"{param}.type")
    return {"role": item.role, "content": _text(item.content, param)}


def _text(content: str | list[InputPart] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type not in _TEXT_PARTS or part.text is None:
            message = f"{param}.content.{j}.type: content of type {part.type!r} is not supported; only text"
            raise APIError(400, message, f"{param}.content.{j}.type")
        texts.append(part.text)
    return "".join(texts)


# ---------------------------------------------------------------- the response object


def _item_id(api_id: str, prefix: str = "msg_", index: int = 0) -> str:
    return f"{prefix}{api_id.removeprefix('resp_')}_{index}"


def _output_items(api_id: str, prepared: PreparedChat, choice: fmt.ChoiceState) -> list[dict[str, Any]]:
    """The message item (when there is text) and one function_call item per parsed call."""
    if not prepared.parses_calls:
        return [_message_item(_item_id(api_id), choice.text, "completed")]
    turn = final_turn(prepared, choice.text)
    items = [_message_item(_item_id(api_id), turn.content, "completed")] if turn.content else []
    for index, call in enumerate(turn.tool_calls, start=len(items)):
        items.append(
            {
                "type": "function_call",
                "id": _item_id(api_id, "fc_", index),
                "call_id": call.id,
                "name": call.name,
                "arguments": call.arguments,
                "status": "completed",
            }
        )
    return items


def _response(
    state: ServerState,
    api_id: str,
    body: ResponsesRequest,
    output: list[dict[str, Any]] | None,
    choice: fmt.ChoiceState | None,
) -> dict[str, Any]:
    """The Response object: in progress (output None) or done, with its items and usage."""
    done = output is not None and choice is not None
    truncated = choice is not None and choice.finish_reason == "length"
    return {
        "id": api_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": ("incomplete" if truncated else "completed") if done else "in_progress",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": state.model_of(body.model),
        "output": output or [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "store": False,
        "background": False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": body.tools or [],
        "truncation": "disabled",
        "metadata": body.metadata or {},
        "user": body.user,
        "usage": _usage(choice) if done and choice is not None else None,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(choice: fmt.ChoiceState) -> dict[str, Any]:
    return {
        "input_tokens": choice.num_prompt_tokens,
        "input_tokens_details": {"cached_tokens": choice.num_cached_tokens},
        "output_tokens": choice.num_generated_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": choice.num_prompt_tokens + choice.num_generated_tokens,
    }


# ---------------------------------------------------------------- streaming


class _EventWriter:
    """SSE lines `event: TYPE` / `data: {...}` with the sequence numbers the openai client reads."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def __call__(self, event_type: str, **payload: Any) -> str:
        data = {"type": event_type, "sequence_number": self.sequence_number, **payload}
        self.sequence_number += 1
        return f"event: {event_type}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(
    state: ServerState, api_id: str, body: ResponsesRequest, prepared: PreparedChat
) -> AsyncIterator[str]:
    """response.created / in_progress, each output item's events, then response.completed (or incomplete).

    Plain text streams as it comes. When tools are on, the output is read whole first (a call's markup must
    not reach the client as text) and its items follow, each with one delta.
    """
    event = _EventWriter()
    yield event("response.created", response=_response(state, api_id, body, None, None))
    yield event("response.in_progress", response=_response(state, api_id, body, None, None))
    choice = fmt.ChoiceState()
    item_id = _item_id(api_id)
    streams_text = not prepared.parses_calls
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    if streams_text:
        yield event(
            "response.output_item.added", output_index=0, item=_message_item(item_id, "", "in_progress")
        )
        yield event("response.content_part.added", part=_text_part(""), **where)
    try:
        async for out in chat_outputs(state, api_id, prepared.submission):
            choice.add(out)
            if out.text and streams_text:
                yield event("response.output_text.delta", delta=out.text, logprobs=[], **where)
    except Exception as error:  # the stream has begun: the error is an event, as OpenAI sends one
        yield _error_event(event, api_id, error)
        return
    items = _output_items(api_id, prepared, choice)
    if streams_text:
        for line in _message_done_events(event, items[0], 0):
            yield line
    else:
        for index, item in enumerate(items):
            for line in _whole_item_events(event, item, index):
                yield line
    final = _response(state, api_id, body, items, choice)
    yield event(
        "response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final
    )


def _message_done_events(event: _EventWriter, item: dict[str, Any], index: int) -> list[str]:
    text = item["content"][0]["text"]
    where = {"item_id": item["id"], "output_index": index, "content_index": 0}
    return [
        event("response.output_text.done", text=text, logprobs=[], **where),
        event("response.content_part.done", part=_text_part(text), **where),
        event("response.output_item.done", output_index=index, item=item),
    ]


def _whole_item_events(event: _EventWriter, item: dict[str, Any], index: int) -> list[str]:
    """An item whose content is known: added, its one delta, done."""
    if item["type"] == "message":
        text = item["content"][0]["text"]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "content": []},
            ),
            event("response.content_part.added", part=_text_part(""), **where),
            event("response.output_text.delta", delta=text, logprobs=[], **where),
            *_message_done_events(event, item, index),
        ]
    where = {"item_id": item["id"], "output_index": index}
    started = {**item, "status": "in_progress", "arguments": ""}
    return [
        event("response.output_item.added", output_index=index, item=started),
        event("response.function_call_arguments.delta", delta=item["arguments"], **where),
        event(
            "response.function_call_arguments.done", arguments=item["arguments"], name=item["name"], **where
        ),
        event("response.output_item.done", output_index=index, item=item),
    ]


def _error_event(event: _EventWriter, api_id: str, error: Exception) -> str:
    api_error = error if isinstance(error, APIError) else internal_error(api_id, error)
    detail = error_body(api_error.status_code, api_error.message, api_error.param, api_error.code)["error"]
    return event(
        "error", code=detail["code"] or detail["type"], message=detail["message"], param=detail["param"]
    )
