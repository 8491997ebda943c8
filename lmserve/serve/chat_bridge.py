"""The chat path that /v1/messages and /v1/responses share with /v1/chat/completions: one conversation, one choice.

Each route converts its request into a `ChatCompletionRequest`, so templating, context checks and sampling
fields go through the same functions (serve/sampling.py) as OpenAI's chat route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from lmserve.generation import RequestOutput
from lmserve.serve import formatting as fmt
from lmserve.serve import sampling
from lmserve.serve.errors import internal_error
from lmserve.serve.protocol import ChatCompletionRequest
from lmserve.serve.state import ServerState
from lmserve.serve.streams import Submission, run_choices


def prepare_chat(state: ServerState, chat: ChatCompletionRequest) -> Submission:
    """The engine request of a chat: template, context check and sampling exactly as /v1/chat/completions."""
    state.check_model(chat.model)
    sampling.check_supported(chat)
    messages = sampling.chat_messages(chat.messages)
    prompt_ids = sampling.encode_chat(
        state.engine.tokenizer, messages, chat.chat_template_kwargs or {}, "messages"
    )
    state.log_prompt("chat", str(messages), chat.user)
    max_new_tokens = sampling.chat_max_tokens(chat)
    sampling.check_context(len(prompt_ids), max_new_tokens, state.engine.session_len, "messages")
    config = sampling.build_generation_config(
        chat, state.engine.default_generation_config, max_new_tokens, None, state.engine.tokenizer.vocab_size
    )
    return Submission(0, prompt_ids, config)


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
