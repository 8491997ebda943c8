"""The chat path that /v1/messages and /v1/responses share with /v1/chat/completions: one conversation, one choice.

Each route converts its request into a `ChatCompletionRequest`, so templating, context checks and sampling
fields go through the same functions (serve/sampling.py) as OpenAI's chat route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lmserve.generation import RequestOutput
from lmserve.serve import formatting as fmt
from lmserve.serve import openai, sampling
from lmserve.serve.assistant import AssistantTurn, assistant_turn
from lmserve.serve.constraints import ToolPlan
from lmserve.serve.errors import internal_error
from lmserve.serve.protocol import ChatCompletionRequest
from lmserve.serve.state import ServerState
from lmserve.serve.streams import Submission, run_choices, stop_on_disconnect


@dataclass(frozen=True)
class PreparedChat:
    submission: Submission
    tools: ToolPlan

    @property
    def parses_calls(self) -> bool:
        """The output is read for tool calls (tools given and tool_choice not none)."""
        return self.tools.parser is not None and self.tools.mode != "none"


def prepare_chat(state: ServerState, chat: ChatCompletionRequest) -> PreparedChat:
    """The engine request of a chat: tools, template, context check and sampling exactly as /v1/chat/completions."""
    state.check_model(chat.model)
    sampling.check_supported(chat)
    tools, config, prompt_ids = openai.chat_request(state, chat)
    return PreparedChat(Submission(0, prompt_ids, config), tools)


def final_turn(prepared: PreparedChat, text: str) -> AssistantTurn:
    """The text and tool calls of a whole output (reasoning, if any, stays in the text: these APIs' own
    reasoning blocks are not wired)."""
    return assistant_turn(text, None, prepared.tools)


async def chat_outputs(
    state: ServerState, api_id: str, submission: Submission
) -> AsyncIterator[RequestOutput]:
    """The engine's deltas of one choice, holding a concurrency slot; an engine error raises a 500 APIError."""
    async with state.slot():
        async for _, out in run_choices(state.engine, api_id, [submission], state.in_flight, state.metrics):
            if out.error:
                raise internal_error(api_id, f"engine error: {out.error}")
            yield out


async def collect_chat(state: ServerState, api_id: str, submission: Submission) -> fmt.ChoiceState:
    choice = fmt.ChoiceState()
    async for out in chat_outputs(state, api_id, submission):
        choice.add(out)
    return choice


def matched_stop_sequence(
    state: ServerState, choice: fmt.ChoiceState, stop_words: tuple[str, ...]
) -> str | None:
    """Which stop string ended a choice (None when EOS or a length limit did).

    The text is cut before the stop string, but the tokens run to the one that completed it: what those
    tokens say past the text begins with the stop string. An EOS token as the last one means no string did.
    """
    if choice.finish_reason != "stop" or not stop_words or not choice.token_ids:
        return None
    if choice.token_ids[-1] in state.engine.tokenizer.eos_token_ids:
        return None
    rest = str(state.engine.tokenizer.decode(choice.token_ids))[len(choice.text) :]
    found = [word for word in stop_words if word in rest]
    return min(found, key=rest.index) if found else None


def event_stream(state: ServerState, request: Request, api_id: str, events: AsyncIterator[str]) -> Response:
    """SSE whose engine request is aborted the moment the client goes away."""

    def on_disconnect() -> None:
        state.in_flight.abort(state.engine, api_id)

    return StreamingResponse(
        stop_on_disconnect(request, events, on_disconnect), media_type="text/event-stream"
    )
