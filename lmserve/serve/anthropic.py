"""Anthropic's Messages API: POST /v1/messages (JSON and its SSE events) and /v1/messages/count_tokens.

A request becomes the same internal chat request as /v1/chat/completions (chat_bridge); errors leave in
Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`, validation errors included.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmserve.serve import formatting as fmt
from lmserve.serve.chat_bridge import (
    PreparedChat,
    chat_outputs,
    collect_chat,
    event_stream,
    final_turn,
    matched_stop_sequence,
    prepare_chat,
)
from lmserve.serve.errors import APIError, internal_error, most_specific, validation_message
from lmserve.serve.protocol import ChatCompletionRequest, RequestModel, random_id
from lmserve.serve.state import ServerState, get_state
from lmserve.serve.streams import unless_disconnected

router = APIRouter()
Model = TypeVar("Model", bound=BaseModel)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# our finish reasons as Anthropic's stop reasons ("stop" is end_turn or stop_sequence: see _stop_reason);
# Anthropic has no reason for an abort (/abort_request): the turn just ended
_STOP_REASONS = {"length": "max_tokens", "abort": "end_turn"}


class ContentBlock(RequestModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class AnthropicMessage(RequestModel):
    role: Literal["user", "assistant"]
    content: Union[str, list[ContentBlock]]


class CountTokensRequest(RequestModel):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[ContentBlock], None] = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


@router.post("/v1/messages")
async def create_message(request: Request) -> Response:
    """Anthropic's Messages API over the chat path; `stream: true` sends Anthropic's SSE events."""
    try:
        body = await _parse(request, MessagesRequest)
        state = get_state(request)
        prepared = prepare_chat(state, _chat_request(body))
    except APIError as error:
        return anthropic_error(error.status_code, error.message)
    api_id = random_id("msg_")
    if body.stream:
        return event_stream(state, request, api_id, _message_events(state, api_id, prepared))
    try:
        choice = await unless_disconnected(request, collect_chat(state, api_id, prepared.submission))
    except APIError as error:
        return anthropic_error(error.status_code, error.message)
    return JSONResponse(_message(state, api_id, prepared, choice))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    """The prompt's token count, as /v1/messages would render it (Anthropic's count_tokens)."""
    try:
        body = await _parse(request, CountTokensRequest)
        state = get_state(request)
        ids = prepare_chat(state, _chat_request(body)).submission.prompt_token_ids
    except APIError as error:
        return anthropic_error(error.status_code, error.message)
    return JSONResponse({"input_tokens": len(ids)})


def anthropic_error(status_code: int, message: str) -> JSONResponse:
    error_type = _ERROR_TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "api_error")
    return JSONResponse({"type": "error", "error": {"type": error_type, "message": message}}, status_code)


async def _parse(request: Request, model: type[Model]) -> Model:
    """The body as `model`; 400 naming the field (what FastAPI's validation would say, in Anthropic's shape)."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        message, _ = validation_message(most_specific(list(error.errors())))  # type: ignore[arg-type]
        raise APIError(400, message) from error


# ---------------------------------------------------------------- request -> chat


def _chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """Anthropic's fields as OpenAI chat fields (system first, blocks as text, tool calls and tool messages)."""
    _check_supported(body)
    messages: list[dict[str, Any]] = []
    if body.system is not None:
        messages.append({"role": "system", "content": _text_of(body.system, "system")})
    for i, message in enumerate(body.messages):
        messages += _chat_messages(message, f"messages.{i}.content")
    fields: dict[str, Any] = {"model": body.model, "messages": messages}
    if body.tools:
        fields["tools"] = [_openai_tool(tool, i) for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        fields.update(_openai_tool_choice(body.tool_choice))
    if isinstance(body, MessagesRequest):
        fields.update(_sampling_fields(body))
    return ChatCompletionRequest.model_validate(fields)


def _sampling_fields(body: MessagesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"max_tokens": body.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            fields[name] = getattr(body, name)
    if body.stop_sequences:
        fields["stop"] = body.stop_sequences
    user = (body.metadata or {}).get("user_id")
    if isinstance(user, str):
        fields["user"] = user
    return fields


def _check_supported(body: CountTokensRequest) -> None:
    if isinstance(body.thinking, dict) and body.thinking.get("type") == "enabled":
        raise APIError(400, "thinking: extended thinking is not supported by this server", "thinking")
    if isinstance(body, MessagesRequest) and (body.output_config or {}).get("format") is not None:
        message = "output_config.format: structured output is not supported by this server yet"
        raise APIError(400, message, "output_config.format")


def _openai_tool(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise APIError(400, f"tools.{index}: a tool needs a name (and an input_schema)", f"tools.{index}")
    if tool.get("type") not in (None, "custom"):
        raise APIError(
            400, f"tools.{index}.type: server tools ({tool['type']!r}) are not supported", f"tools.{index}"
        )
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _openai_tool_choice(choice: Any) -> dict[str, Any]:
    """auto / any / tool (named) / none as OpenAI's tool_choice; disable_parallel_tool_use as parallel_tool_calls."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    names = {"auto": "auto", "any": "required", "none": "none"}
    if kind == "tool":
        fields: dict[str, Any] = {
            "tool_choice": {"type": "function", "function": {"name": choice.get("name")}}
        }
    elif kind in names:
        fields = {"tool_choice": names[kind]}
    else:
        raise APIError(400, "tool_choice.type must be one of 'auto', 'any', 'tool', 'none'", "tool_choice")
    if choice.get("disable_parallel_tool_use"):
        fields["parallel_tool_calls"] = False
    return fields


def _chat_messages(message: AnthropicMessage, param: str) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages: tool results become tool messages, tool_use blocks tool calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    results = [
        _tool_message(b, f"{param}.{j}") for j, b in enumerate(message.content) if b.type == "tool_result"
    ]
    calls = [_tool_call(b, f"{param}.{j}") for j, b in enumerate(message.content) if b.type == "tool_use"]
    blocks = [b for b in message.content if b.type not in ("tool_result", "tool_use")]
    if not blocks and (results or calls):
        text = None
    else:
        text = _text_of(blocks, param)
    turn: list[dict[str, Any]] = []
    if text is not None or calls:
        turn.append({"role": message.role, "content": text or "", **({"tool_calls": calls} if calls else {})})
    return results + turn


def _tool_call(block: ContentBlock, param: str) -> dict[str, Any]:
    extra = block.model_extra or {}
    if not isinstance(extra.get("name"), str) or not isinstance(extra.get("id"), str):
        raise APIError(400, f"{param}: a tool_use block needs an id and a name", param)
    arguments = json.dumps(extra.get("input") or {}, ensure_ascii=False)
    return {
        "id": extra["id"],
        "type": "function",
        "function": {"name": extra["name"], "arguments": arguments},
    }


def _tool_message(block: ContentBlock, param: str) -> dict[str, Any]:
    extra = block.model_extra or {}
    if not isinstance(extra.get("tool_use_id"), str):
        raise APIError(400, f"{param}: a tool_result block needs its tool_use_id", param)
    content = extra.get("content") or ""
    if not isinstance(content, str):
        try:
            blocks = [ContentBlock.model_validate(item) for item in content]
        except ValidationError as error:
            raise APIError(400, f"{param}.content: text blocks or a string", f"{param}.content") from error
        content = _text_of(blocks, f"{param}.content")
    return {"role": "tool", "tool_call_id": extra["tool_use_id"], "content": content}


def _text_of(content: str | list[ContentBlock], param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.type != "text" or block.text is None:
            message = (
                f"{param}.{j}.type: content blocks of type {block.type!r} are not supported here; only 'text'"
            )
            raise APIError(400, message, f"{param}.{j}.type")
        texts.append(block.text)
    return "".join(texts)


# ---------------------------------------------------------------- responses


def _stop_reason(
    state: ServerState, prepared: PreparedChat, choice: fmt.ChoiceState, made_calls: bool
) -> tuple[str, str | None]:
    sequence = matched_stop_sequence(state, choice, prepared.submission.gen_config.stop_words)
    if sequence is not None:
        return "stop_sequence", sequence
    if made_calls and choice.finish_reason == "stop":
        return "tool_use", None
    return _STOP_REASONS.get(choice.finish_reason or "", "end_turn"), None


def _content_blocks(prepared: PreparedChat, text: str) -> list[dict[str, Any]]:
    """The text block (when there is text) and a tool_use block per parsed call."""
    if not prepared.parses_calls:
        return [{"type": "text", "text": text}]
    turn = final_turn(prepared, text)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": turn.content}] if turn.content else []
    for call in turn.tool_calls:
        tool_id = "toolu_" + call.id.removeprefix("call_")
        blocks.append(
            {"type": "tool_use", "id": tool_id, "name": call.name, "input": json.loads(call.arguments)}
        )
    return blocks


def _message(
    state: ServerState, api_id: str, prepared: PreparedChat, choice: fmt.ChoiceState
) -> dict[str, Any]:
    blocks = _content_blocks(prepared, choice.text)
    reason, sequence = _stop_reason(state, prepared, choice, any(b["type"] == "tool_use" for b in blocks))
    message = _message_start(state, api_id, prepared, choice.num_prompt_tokens)
    message.update(
        content=blocks,
        stop_reason=reason,
        stop_sequence=sequence,
        usage={"input_tokens": choice.num_prompt_tokens, "output_tokens": choice.num_generated_tokens},
    )
    return message


def _message_start(
    state: ServerState, api_id: str, prepared: PreparedChat, num_prompt_tokens: int
) -> dict[str, Any]:
    return {
        "id": api_id,
        "type": "message",
        "role": "assistant",
        "model": state.model_of(prepared.submission.gen_config.adapter_name),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": num_prompt_tokens, "output_tokens": 0},
    }


def _event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload}, ensure_ascii=False)}\n\n"


async def _message_events(state: ServerState, api_id: str, prepared: PreparedChat) -> AsyncIterator[str]:
    """message_start, the content blocks (start, deltas, stop), message_delta (stop reason, usage), message_stop.

    Plain text streams as it comes. When tools are on, the output is read whole first (a call's markup must
    not reach the client as text) and its blocks follow, each with one delta.
    """
    num_prompt_tokens = len(prepared.submission.prompt_token_ids)
    yield _event("message_start", {"message": _message_start(state, api_id, prepared, num_prompt_tokens)})
    yield _event("ping", {})
    choice = fmt.ChoiceState()
    streams_text = not prepared.parses_calls
    if streams_text:
        yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    try:
        async for out in chat_outputs(state, api_id, prepared.submission):
            choice.add(out)
            if out.text and streams_text:
                yield _event(
                    "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": out.text}}
                )
    except Exception as error:  # the stream has begun: the error is an event, as Anthropic sends one
        api_error = error if isinstance(error, APIError) else internal_error(api_id, error)
        body = json.loads(bytes(anthropic_error(api_error.status_code, api_error.message).body))
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
        return
    blocks = (
        [{"type": "text", "text": choice.text}] if streams_text else _content_blocks(prepared, choice.text)
    )
    if streams_text:
        yield _event("content_block_stop", {"index": 0})
    else:
        for index, block in enumerate(blocks):
            for event in _whole_block_events(index, block):
                yield event
    reason, sequence = _stop_reason(state, prepared, choice, any(b["type"] == "tool_use" for b in blocks))
    delta = {"stop_reason": reason, "stop_sequence": sequence}
    yield _event("message_delta", {"delta": delta, "usage": {"output_tokens": choice.num_generated_tokens}})
    yield _event("message_stop", {})


def _whole_block_events(index: int, block: dict[str, Any]) -> list[str]:
    start: dict[str, Any]
    if block["type"] == "text":
        start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
    else:
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
    return [
        _event("content_block_start", {"index": index, "content_block": start}),
        _event("content_block_delta", {"index": index, "delta": delta}),
        _event("content_block_stop", {"index": index}),
    ]
