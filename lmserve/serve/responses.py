"""OpenAI's Responses API, the stateless subset: POST /v1/responses (JSON and its SSE events) over the chat path.

Nothing is stored: previous_response_id, background and store=true are refused with a 400 naming the field.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field

from lmserve.serve import formatting as fmt
from lmserve.serve.chat_bridge import chat_outputs, collect_chat, prepare_chat
from lmserve.serve.errors import APIError, error_body, internal_error
from lmserve.serve.protocol import ChatCompletionRequest, ErrorResponse, RequestModel, random_id
from lmserve.serve.state import ServerState, get_state
from lmserve.serve.streams import Submission, stop_on_disconnect, unless_disconnected

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
    # fields of the stored / tool-using API, refused (never dropped) in _check_supported
    previous_response_id: str | None = None
    background: bool | None = None
    store: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
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
    submission = prepare_chat(state, _chat_request(body))
    api_id = random_id("resp_")
    if body.stream:
        events = _events(state, api_id, body, submission)

        def on_disconnect() -> None:
            state.in_flight.abort(state.engine, api_id)

        return StreamingResponse(
            stop_on_disconnect(request, events, on_disconnect), media_type="text/event-stream"
        )
    choice = await unless_disconnected(request, collect_chat(state, api_id, submission))
    return JSONResponse(_response(state, api_id, body, choice, _item_id(api_id)))


def _check_supported(body: ResponsesRequest) -> None:
    refused = {
        "previous_response_id": "this server keeps no responses; send the whole conversation as `input`",
        "conversation": "this server keeps no conversations; send the whole conversation as `input`",
        "prompt": "stored prompts are not supported; send the text as `input`",
        "tools": "tools are not supported by this server yet",
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
    _check_options(body)


def _check_options(body: ResponsesRequest) -> None:
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice: tools are not supported by this server yet", "tool_choice")
    text_format = (body.text or {}).get("format") or {"type": "text"}
    if text_format.get("type") != "text":
        message = f"text.format type {text_format.get('type')!r} is not supported yet; only 'text'"
        raise APIError(400, message, "text.format")
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
    """instructions as the system turn, then the input items as chat messages (text parts joined)."""
    messages: list[dict[str, str]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        messages += [_message(item, i) for i, item in enumerate(body.input)]
    if not messages:
        raise APIError(400, "input must hold at least one message", "input")
    fields: dict[str, Any] = {"model": body.model, "messages": messages}
    optional = {"max_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p}
    fields.update({name: value for name, value in optional.items() if value is not None})
    if body.user is not None:
        fields["user"] = body.user
    return ChatCompletionRequest.model_validate(fields)


def _message(item: InputItem, index: int) -> dict[str, str]:
    param = f"input.{index}"
    if item.type != "message" or item.role is None:
        message = f"{param}.type: input items of type {item.type!r} are not supported yet; only messages"
        raise APIError(400, message, f"{param}.type")
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


def _item_id(api_id: str) -> str:
    return "msg_" + api_id.removeprefix("resp_")


def _response(
    state: ServerState, api_id: str, body: ResponsesRequest, choice: fmt.ChoiceState | None, item_id: str
) -> dict[str, Any]:
    """The Response object: in progress (choice None) or done, with its one message item and usage."""
    done = choice is not None and choice.finish_reason is not None
    truncated = choice is not None and choice.finish_reason == "length"
    response: dict[str, Any] = {
        "id": api_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": ("incomplete" if truncated else "completed") if done else "in_progress",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": state.config.model_name,
        "output": [_output_item(item_id, choice.text, "completed")] if done and choice else [],
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "store": False,
        "background": False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "truncation": "disabled",
        "metadata": body.metadata or {},
        "user": body.user,
        "usage": _usage(choice) if done and choice else None,
    }
    return response


def _output_item(item_id: str, text: str, status: str) -> dict[str, Any]:
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
    state: ServerState, api_id: str, body: ResponsesRequest, submission: Submission
) -> AsyncIterator[str]:
    """response.created / in_progress, the message item's events with its text deltas, then completed."""
    event, item_id = _EventWriter(), _item_id(api_id)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=_response(state, api_id, body, None, item_id))
    yield event("response.in_progress", response=_response(state, api_id, body, None, item_id))
    yield event("response.output_item.added", output_index=0, item=_output_item(item_id, "", "in_progress"))
    yield event("response.content_part.added", part=_text_part(""), **where)
    choice = fmt.ChoiceState()
    try:
        async for out in chat_outputs(state, api_id, submission):
            choice.add(out)
            if out.text:
                yield event("response.output_text.delta", delta=out.text, logprobs=[], **where)
    except Exception as error:  # the stream has begun: the error is an event, as OpenAI sends one
        yield _error_event(event, api_id, error)
        return
    yield event("response.output_text.done", text=choice.text, logprobs=[], **where)
    yield event("response.content_part.done", part=_text_part(choice.text), **where)
    yield event(
        "response.output_item.done", output_index=0, item=_output_item(item_id, choice.text, "completed")
    )
    final = _response(state, api_id, body, choice, item_id)
    yield event(
        "response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final
    )


def _error_event(event: _EventWriter, api_id: str, error: Exception) -> str:
    api_error = error if isinstance(error, APIError) else internal_error(api_id, error)
    detail = error_body(api_error.status_code, api_error.message, api_error.param, api_error.code)["error"]
    return event(
        "error", code=detail["code"] or detail["type"], message=detail["message"], param=detail["param"]
    )
