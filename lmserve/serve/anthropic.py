"""Anthropic's Messages API: POST /v1/messages (JSON and its SSE events) and /v1/messages/count_tokens.

A request becomes the same internal chat request as /v1/chat/completions (chat_bridge); errors leave in
Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`, validation errors included.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmserve.serve import formatting as fmt
from lmserve.serve import sampling
from lmserve.serve.chat_bridge import chat_outputs, collect_chat, matched_stop_sequence, prepare_chat
from lmserve.serve.errors import APIError, internal_error, most_specific, validation_message
from lmserve.serve.protocol import ChatCompletionRequest, RequestModel, random_id
from lmserve.serve.state import ServerState, get_state
from lmserve.serve.streams import Submission, stop_on_disconnect, unless_disconnected

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


@router.post("/v1/messages", include_in_schema=True)
async def create_message(request: Request) -> Response:
    """Anthropic's Messages API over the chat path; `stream: true` sends Anthropic's SSE events."""
    try:
        body = await _parse(request, MessagesRequest)
        state = get_state(request)
        chat = _chat_request(body)
        submission = prepare_chat(state, chat)
    except APIError as error:
        return anthropic_error(error.status_code, error.message)
    api_id = random_id("msg_")
    stop_words = submission.gen_config.stop_words
    if body.stream:
        events = _message_events(state, api_id, submission, stop_words)
        return event_stream(state, request, api_id, events)
    try:
        choice = await unless_disconnected(request, collect_chat(state, api_id, submission))
    except APIError as error:
        return anthropic_error(error.status_code, error.message)
    return JSONResponse(_message(state, api_id, choice, stop_words))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    """The prompt's token count, as /v1/messages would render it (Anthropic's count_tokens)."""
    try:
        body = await _parse(request, CountTokensRequest)
        state = get_state(request)
        chat = _chat_request(body)
        state.check_model(chat.model)
        messages = sampling.chat_messages(chat.messages)
        ids = sampling.encode_chat(state.engine.tokenizer, messages, {}, "messages")
    except APIError as error:
        return anthropic_error(error.status_code, error.message)
    return JSONResponse({"input_tokens": len(ids)})


def event_stream(state: ServerState, request: Request, api_id: str, events: AsyncIterator[str]) -> Response:
    """SSE whose engine request is aborted the moment the client goes away."""

    def on_disconnect() -> None:
        state.in_flight.abort(state.engine, api_id)

    return StreamingResponse(
        stop_on_disconnect(request, events, on_disconnect), media_type="text/event-stream"
    )


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
    """Anthropic's fields as OpenAI chat fields (system first, text blocks joined); 400 for what we lack."""
    _check_supported(body)
    messages: list[dict[str, Any]] = []
    if body.system is not None:
        messages.append({"role": "system", "content": _text_of(body.system, "system")})
    for i, message in enumerate(body.messages):
        messages.append({"role": message.role, "content": _text_of(message.content, f"messages.{i}.content")})
    fields: dict[str, Any] = {"model": body.model, "messages": messages}
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
    if body.tools:
        raise APIError(400, "tools: tool use is not supported by this server yet", "tools")
    if body.tool_choice is not None:
        raise APIError(400, "tool_choice: tool use is not supported by this server yet", "tool_choice")
    if isinstance(body.thinking, dict) and body.thinking.get("type") == "enabled":
        raise APIError(400, "thinking: extended thinking is not supported by this server", "thinking")
    if isinstance(body, MessagesRequest) and (body.output_config or {}).get("format") is not None:
        message = "output_config.format: structured output is not supported by this server yet"
        raise APIError(400, message, "output_config.format")


def _text_of(content: str | list[ContentBlock], param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.type != "text" or block.text is None:
            message = (
                f"{param}.{j}.type: content blocks of type {block.type!r} are not supported; only 'text'"
            )
            raise APIError(400, message, f"{param}.{j}.type")
        texts.append(block.text)
    return "".join(texts)


# ---------------------------------------------------------------- responses


def _stop_reason(
    state: ServerState, choice: fmt.ChoiceState, stop_words: tuple[str, ...]
) -> tuple[str, str | None]:
    sequence = matched_stop_sequence(state, choice, stop_words)
    if sequence is not None:
        return "stop_sequence", sequence
    return _STOP_REASONS.get(choice.finish_reason or "", "end_turn"), None


def _message(
    state: ServerState, api_id: str, choice: fmt.ChoiceState, stop_words: tuple[str, ...]
) -> dict[str, Any]:
    reason, sequence = _stop_reason(state, choice, stop_words)
    message = _message_start(state, api_id, choice.num_prompt_tokens)
    message.update(
        content=[{"type": "text", "text": choice.text}],
        stop_reason=reason,
        stop_sequence=sequence,
        usage={"input_tokens": choice.num_prompt_tokens, "output_tokens": choice.num_generated_tokens},
    )
    return message


def _message_start(state: ServerState, api_id: str, num_prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": api_id,
        "type": "message",
        "role": "assistant",
        "model": state.config.model_name,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": num_prompt_tokens, "output_tokens": 0},
    }


def _event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload}, ensure_ascii=False)}\n\n"


async def _message_events(
    state: ServerState, api_id: str, submission: Submission, stop_words: tuple[str, ...]
) -> AsyncIterator[str]:
    """message_start, one text block (start, deltas, stop), message_delta (stop reason, usage), message_stop."""
    yield _event(
        "message_start", {"message": _message_start(state, api_id, len(submission.prompt_token_ids))}
    )
    yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield _event("ping", {})
    choice = fmt.ChoiceState()
    try:
        async for out in chat_outputs(state, api_id, submission):
            choice.add(out)
            if out.text:
                yield _event(
                    "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": out.text}}
                )
    except Exception as error:  # the stream has begun: the error is an event, as Anthropic sends one
        api_error = error if isinstance(error, APIError) else internal_error(api_id, error)
        body = json.loads(bytes(anthropic_error(api_error.status_code, api_error.message).body))
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
        return
    reason, sequence = _stop_reason(state, choice, stop_words)
    yield _event("content_block_stop", {"index": 0})
    delta = {"stop_reason": reason, "stop_sequence": sequence}
    yield _event("message_delta", {"delta": delta, "usage": {"output_tokens": choice.num_generated_tokens}})
    yield _event("message_stop", {})
