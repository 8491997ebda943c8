"""OpenAI routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (JSON and SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.generation import GenerationConfig
from lmserve.serve import constraints, sampling
from lmserve.serve import formatting as fmt
from lmserve.serve.assistant import AssistantStream, AssistantTurn, assistant_turn, finish_reason
from lmserve.serve.constraints import ToolPlan
from lmserve.serve.errors import APIError, error_body, internal_error
from lmserve.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    now,
    random_id,
)
from lmserve.serve.reasoning import ReasoningParser, reasoning_parser_for
from lmserve.serve.state import ServerState, get_state
from lmserve.serve.streams import Submission, run_choices, stop_on_disconnect, unless_disconnected
from lmserve.serve.tool_parsers import tool_parser_for
from lmserve.structured import StructuredOutput

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500)
}


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    name, session_len = state.config.model_name, state.engine.session_len
    base = ModelCard(id=name, root=name, max_model_len=session_len)
    adapters = [
        ModelCard(id=a, root=a, parent=name, max_model_len=session_len) for a in state.config.adapters
    ]
    return ModelList(data=[base, *adapters])


# ---------------------------------------------------------------- chat


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    state.check_model(body.model)
    sampling.check_supported(body)
    tools, config, prompt_ids = chat_request(state, body)
    api_id = random_id("chatcmpl-")
    submissions = [Submission(i, prompt_ids, choice) for i, choice in enumerate(config.fan_out())]
    reasoning = reasoning_parser_for(state.config.reasoning_parser)
    if body.stream:
        chunks = _chat_stream(state, api_id, body, submissions, AssistantParts(reasoning, tools))
        return _event_stream(state, request, api_id, chunks)
    choices = await unless_disconnected(request, _collect(state, api_id, submissions))
    turns = [assistant_turn(c.text, reasoning, tools) for c in choices]
    return JSONResponse(_chat_response(state, api_id, body, choices, turns).model_dump())


def chat_request(
    state: ServerState, body: ChatCompletionRequest
) -> tuple[ToolPlan, GenerationConfig, list[int]]:
    """The tool plan, sampling config and prompt of a chat request (checked; APIError 400 naming the field)."""
    template = getattr(state.engine.tokenizer, "chat_template", None)  # a test's fake tokenizer may have none
    parser = tool_parser_for(state.config.tool_call_parser, template)
    tools = constraints.tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls, parser)
    response_format = body.response_format.model_dump() if body.response_format is not None else None
    structured = constraints.structured_output_of(response_format, body.structured_outputs, body.regex_schema)
    if structured is not None and tools.grammar is not None:
        raise APIError(
            400, "response_format cannot be combined with tool_choice required or named", "tool_choice"
        )
    prompt_ids = _encode_chat(state, body, tools.tools)
    max_new_tokens = sampling.chat_max_tokens(body)
    sampling.check_context(len(prompt_ids), max_new_tokens, state.engine.session_len, "messages")
    config = sampling.build_generation_config(
        body,
        state.engine.default_generation_config,
        max_new_tokens,
        sampling.chat_logprobs(body),
        state.engine.tokenizer.vocab_size,
        _after_reasoning(state, tools.grammar or structured),
    )
    if tools.parser is not None and tools.mode != "none" and tools.parser.markers_are_special:
        config = config.with_updates(skip_special_tokens=False)
    return tools, config.with_updates(adapter_name=state.adapter_of(body.model)), prompt_ids


def _after_reasoning(state: ServerState, spec: StructuredOutput | None) -> StructuredOutput | None:
    """With a reasoning parser the grammar starts after the model's `</think>` token."""
    reasoning = reasoning_parser_for(state.config.reasoning_parser)
    if spec is None or reasoning is None:
        return spec
    end_ids = state.engine.tokenizer.encode(reasoning.end, add_special_tokens=False)
    if len(end_ids) != 1:
        raise APIError(
            400,
            f"this model has no single {reasoning.end} token to start the grammar after",
            "response_format",
        )
    return replace(spec, start_after_token_id=end_ids[0])


def _event_stream(
    state: ServerState, request: Request, api_id: str, chunks: AsyncIterator[str]
) -> StreamingResponse:
    """SSE response whose engine requests are aborted the moment the client goes away."""

    def on_disconnect() -> None:
        state.in_flight.abort(state.engine, api_id)

    return StreamingResponse(
        stop_on_disconnect(request, chunks, on_disconnect), media_type="text/event-stream"
    )


def _encode_chat(state: ServerState, body: ChatCompletionRequest, tools: list[dict[str, Any]]) -> list[int]:
    messages = sampling.chat_messages(body.messages)
    template_kwargs = dict(body.chat_template_kwargs or {})
    if tools:
        template_kwargs["tools"] = tools
    ids = sampling.encode_chat(state.engine.tokenizer, messages, template_kwargs, "messages")
    state.log_prompt("chat", str(messages), body.user)
    return ids


async def _collect(state: ServerState, api_id: str, submissions: list[Submission]) -> list[fmt.ChoiceState]:
    choices = [fmt.ChoiceState() for _ in submissions]
    async with state.slot():
        async for index, out in run_choices(
            state.engine, api_id, submissions, state.in_flight, state.metrics
        ):
            if out.error:
                raise internal_error(api_id, f"engine error: {out.error}")
            choices[index].add(out)
    return choices


def _chat_response(
    state: ServerState,
    api_id: str,
    body: ChatCompletionRequest,
    choices: list[fmt.ChoiceState],
    turns: list[AssistantTurn],
) -> ChatCompletionResponse:
    k = body.top_logprobs or 0
    return ChatCompletionResponse(
        id=api_id,
        model=state.model_of(body.model),
        choices=[
            ChatChoice(
                index=i,
                message=_message(turn),
                logprobs=fmt.chat_logprobs(state.token_text, c.logprobs, k) if body.logprobs else None,
                finish_reason=finish_reason(fmt.finish_reason(c.finish_reason), bool(turn.tool_calls)),
            )
            for i, (c, turn) in enumerate(zip(choices, turns, strict=True))
        ],
        usage=fmt.usage_of(choices, body.n),
    )


def _message(turn: AssistantTurn) -> AssistantMessage:
    return AssistantMessage(
        content=turn.content,
        tool_calls=[call.to_openai() for call in turn.tool_calls] or None,
        reasoning_content=turn.reasoning,
        reasoning=turn.reasoning,
    )


class AssistantParts:
    """Makes one AssistantStream per choice of a streamed chat request."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolPlan) -> None:
        self.reasoning = reasoning
        self.tools = tools if tools.parser is not None and tools.mode != "none" else None

    def stream(self) -> AssistantStream:
        return AssistantStream(self.reasoning, self.tools)


async def _chat_stream(
    state: ServerState,
    api_id: str,
    body: ChatCompletionRequest,
    submissions: list[Submission],
    parts: AssistantParts,
) -> AsyncIterator[str]:
    created, model = now(), state.model_of(body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    streams = {sub.index: parts.stream() for sub in submissions}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return fmt.chat_chunk(api_id, created, model, [choice], include_usage)

    def content(index: int, out: Any) -> str:
        logprobs = None
        if body.logprobs:
            logprobs = fmt.chat_logprobs(
                state.token_text, out.logprobs or [], body.top_logprobs or 0
            ).model_dump()
        deltas = streams[index].push(out.text)
        if not deltas and logprobs is not None:  # the text is held back (a marker half written)
            deltas = [{"content": ""}]
        # logprobs ride on the first delta of the output that carried them
        return "".join(chunk(index, d, logprobs if j == 0 else None) for j, d in enumerate(deltas))

    def finish(index: int, out: Any) -> str:
        held_back = "".join(chunk(index, d) for d in streams[index].push("", final=True))
        reason = finish_reason(fmt.finish_reason(out.finish_reason), streams[index].made_calls)
        return held_back + chunk(index, {}, None, reason)

    def usage(totals: Any) -> str:
        return fmt.chat_chunk(api_id, created, model, [], True, totals)

    for sub in submissions:
        yield chunk(sub.index, {"role": "assistant", "content": ""})
    async for event in _stream_outputs(
        state, api_id, submissions, body.n, content, finish, usage if include_usage else None
    ):
        yield event


async def _stream_outputs(
    state: ServerState,
    api_id: str,
    submissions: list[Submission],
    n: int,
    content: Callable[[int, Any], str],
    finish: Callable[[int, Any], str],
    usage: Callable[[Any], str] | None,
) -> AsyncIterator[str]:
    """The SSE events of a streamed request after its opening chunks, shared by chat and completions.

    content(index, output) formats an output that carries text or logprobs, finish(index, output) the finish
    chunk; usage(totals), when given, the closing usage chunk. An error ends the stream with an OpenAI error body.
    """
    choices = [fmt.ChoiceState() for _ in submissions]
    try:
        async with state.slot():
            async for index, out in run_choices(
                state.engine, api_id, submissions, state.in_flight, state.metrics
            ):
                if out.error:
                    raise internal_error(api_id, f"engine error: {out.error}")
                choices[index].add(out)
                if out.text or out.logprobs:
                    yield content(index, out)
                if out.finished:
                    yield finish(index, out)
    except Exception as error:
        yield _stream_error(api_id, error)
        return
    if usage is not None:
        yield usage(fmt.usage_of(choices, n))
    yield fmt.SSE_DONE


def _stream_error(api_id: str, error: Exception) -> str:
    if not isinstance(error, APIError):
        error = internal_error(api_id, error)
    payload = error_body(error.status_code, error.message, error.param, error.code)
    return fmt.sse(payload) + fmt.SSE_DONE


# ---------------------------------------------------------------- completions


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = get_state(request)
    state.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", "best_of")
    prompts = _completion_prompts(state, body.prompt, body.user)
    for ids in prompts:
        sampling.check_context(len(ids), body.max_tokens, state.engine.session_len, "prompt")
    defaults = state.engine.default_generation_config
    structured = constraints.structured_output_of(None, body.structured_outputs, body.regex_schema)
    config = sampling.build_generation_config(
        body,
        defaults,
        body.max_tokens,
        sampling.completion_logprobs(body),
        state.engine.tokenizer.vocab_size,
        _after_reasoning(state, structured),
    ).with_updates(adapter_name=state.adapter_of(body.model))
    api_id = random_id("cmpl-")
    submissions = [
        Submission(p * body.n + i, ids, choice)
        for p, ids in enumerate(prompts)
        for i, choice in enumerate(config.fan_out())
    ]
    echoes = [_echo_text(state, body, prompts[s.index // body.n]) for s in submissions]
    if body.stream:
        chunks = _completion_stream(state, api_id, body, submissions, echoes)
        return _event_stream(state, request, api_id, chunks)
    choices = await unless_disconnected(request, _collect(state, api_id, submissions))
    return JSONResponse(_completion_response(state, api_id, body, choices, echoes).model_dump())


def _completion_prompts(
    state: ServerState, prompt: str | list[str] | list[int] | list[list[int]], user: str | None
) -> list[list[int]]:
    """Normalize the four shapes OpenAI accepts into token-id lists."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt must not be empty", "prompt")
    return [_prompt_ids(state, item, i, user) for i, item in enumerate(items)]


def _prompt_ids(state: ServerState, item: str | list[int], index: int, user: str | None) -> list[int]:
    tokenizer = state.engine.tokenizer
    ids = list(tokenizer.encode(item, add_special_tokens=True)) if isinstance(item, str) else list(item)
    if not ids:
        raise APIError(400, f"prompt {index} is empty", "prompt")
    vocab_size = tokenizer.vocab_size
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"prompt {index} has token ids outside [0, {vocab_size})", "prompt")
    state.log_prompt("completion", item if isinstance(item, str) else str(ids), user)
    return ids


def _echo_text(state: ServerState, body: CompletionRequest, prompt_ids: list[int]) -> str:
    if not body.echo:
        return ""
    return str(state.engine.tokenizer.decode(prompt_ids, skip_special_tokens=False))


def _completion_response(
    state: ServerState,
    api_id: str,
    body: CompletionRequest,
    choices: list[fmt.ChoiceState],
    echoes: list[str],
) -> CompletionResponse:
    result = []
    for i, c in enumerate(choices):
        logprobs = None
        if body.logprobs is not None:
            logprobs = fmt.completion_logprobs(state.token_text, c.logprobs, body.logprobs, len(echoes[i]))
        result.append(
            CompletionChoice(
                index=i,
                text=echoes[i] + c.text,
                logprobs=logprobs,
                finish_reason=fmt.finish_reason(c.finish_reason),
            )
        )
    return CompletionResponse(
        id=api_id, model=state.model_of(body.model), choices=result, usage=fmt.usage_of(choices, body.n)
    )


async def _completion_stream(
    state: ServerState, api_id: str, body: CompletionRequest, submissions: list[Submission], echoes: list[str]
) -> AsyncIterator[str]:
    created, model = now(), state.model_of(body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    offsets = [len(e) for e in echoes]

    def chunk(index: int, text: str, logprobs: Any = None, reason: str | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return fmt.completion_chunk(api_id, created, model, [choice], include_usage)

    def content(index: int, out: Any) -> str:
        logprobs = None
        if body.logprobs is not None:
            lp = fmt.completion_logprobs(state.token_text, out.logprobs or [], body.logprobs, offsets[index])
            logprobs = lp.model_dump()
        offsets[index] += len(out.text)
        return chunk(index, out.text, logprobs)

    def finish(index: int, out: Any) -> str:
        return chunk(index, "", None, fmt.finish_reason(out.finish_reason))

    def usage(totals: Any) -> str:
        return fmt.completion_chunk(api_id, created, model, [], True, totals)

    for sub in submissions:
        if echoes[sub.index]:
            yield chunk(sub.index, echoes[sub.index])
    async for event in _stream_outputs(
        state, api_id, submissions, body.n, content, finish, usage if include_usage else None
    ):
        yield event
