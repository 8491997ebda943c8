"""OpenAI request fields → GenerationConfig (LMDeploy's names), chat messages, and unsupported-field checks."""

from __future__ import annotations

import json
import re
from typing import Any

from lmserve.engine.client import ChatTokenizer
from lmserve.generation import GenerationConfig
from lmserve.serve.errors import APIError
from lmserve.serve.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from lmserve.structured import StructuredOutput

_UNSUPPORTED_PARTS = {"image_url", "image", "input_image", "input_audio", "audio", "file", "video_url"}
# request fields that map one-to-one onto GenerationConfig fields
_SAME_NAME = ("top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
# a token id as OpenAI's logit_bias keys spell it; 19 digits bound it before int() parses it
_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,19}")
MAX_LOGIT_BIAS = 100.0


def check_supported(request: ChatCompletionRequest) -> None:
    """Reject fields we know but cannot honour, naming the field (never drop them silently)."""
    if request.functions:
        raise APIError(400, "functions are not supported by this server yet", "functions")
    if request.function_call not in (None, "none"):
        raise APIError(400, "function_call is not supported by this server yet", "function_call")
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: role + plain string content (+ name, tool calls, call id)."""
    return [_template_message(m, i) for i, m in enumerate(messages)]


def _template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    result: dict[str, Any] = {"role": _role(message), "content": _text_content(message, index)}
    if message.name is not None:  # templates that know participants' names read it; others ignore it
        result["name"] = message.name
    if message.tool_calls:
        result["tool_calls"] = [
            _template_call(call, f"messages.{index}.tool_calls.{j}")
            for j, call in enumerate(message.tool_calls)
        ]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    return result


def _template_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    """A past call as HF templates read it: arguments as an object (OpenAI sends JSON text)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{param}.function must be an object with a 'name'", f"{param}.function")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError as error:
            raise APIError(
                400, f"{param}.function.arguments is not JSON: {error}", f"{param}.function.arguments"
            ) from error
    name = function["name"]
    return {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": arguments}}


def encode_chat(
    tokenizer: ChatTokenizer, messages: list[dict[str, Any]], template_kwargs: dict[str, Any], param: str
) -> list[int]:
    """Token ids of the rendered chat; 400 naming `param` when the template refuses the conversation."""
    try:
        return list(tokenizer.encode_chat(messages, **template_kwargs))
    except Exception as error:  # the template rejects some conversations (e.g. roles out of order)
        raise APIError(400, f"chat template could not format the messages: {error}", param) from error


def _role(message: ChatMessage) -> str:
    # OpenAI's o-series 'developer' role plays the part of 'system' for every other model
    return "system" if message.role == "developer" else message.role


def _text_content(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        param = f"messages.{index}.content.{j}"
        if part.type in _UNSUPPORTED_PARTS:
            raise APIError(
                400, f"content parts of type {part.type!r} are not supported; only 'text'", f"{param}.type"
            )
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content part type {part.type!r} must be 'text' with a 'text' field", param)
        texts.append(part.text)
    return "".join(texts)


def stop_words(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    words = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not word for word in words):
        raise APIError(400, "stop strings must not be empty", "stop")
    return words


def build_generation_config(
    request: SamplingFields,
    defaults: GenerationConfig,
    max_new_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    response_format: StructuredOutput | None = None,
) -> GenerationConfig:
    """Request fields over the model's defaults; temperature 0 is greedy, > 0 samples (as OpenAI does).

    vocab_size bounds the token ids of logit_bias; response_format is the request's checked output
    constraint (serve/constraints.py: response_format, structured_outputs, regex_schema, tool grammars).
    """
    set_fields = request.model_fields_set
    changes: dict[str, Any] = {name: getattr(request, name) for name in _SAME_NAME if name in set_fields}
    changes = {name: value for name, value in changes.items() if value is not None}
    temperature = request.temperature if request.temperature is not None else defaults.temperature
    changes.update(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        do_sample=temperature > 0.0,
        random_seed=request.seed,
        stop_words=stop_words(request.stop),
        ignore_eos=request.ignore_eos,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        min_new_tokens=_min_new_tokens(request, defaults),
        logit_bias=logit_bias(request.logit_bias, vocab_size),
        logprobs=logprobs,
        n=request.n,  # the choices come from GenerationConfig.fan_out()
        response_format=response_format,
    )
    try:
        return defaults.with_updates(**changes)
    except ValueError as error:
        raise APIError(400, str(error), _field_of(str(error))) from error


def _min_new_tokens(request: SamplingFields, defaults: GenerationConfig) -> int:
    """LMDeploy's min_new_tokens or vLLM's min_tokens: one number under either name."""
    given = {request.min_new_tokens, request.min_tokens} - {None}
    if len(given) > 1:
        message = (
            f"min_tokens={request.min_tokens} and min_new_tokens={request.min_new_tokens} differ; "
            "they are two names of one setting: give one"
        )
        raise APIError(400, message, "min_tokens")
    value = next(iter(given), None)
    return defaults.min_new_tokens if value is None else value


def logit_bias(biases: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} as {token id: bias}; 400 naming logit_bias for a bad id or bias."""
    if not biases:
        return None
    return {_bias_token_id(key, vocab_size): _checked_bias(key, bias) for key, bias in biases.items()}


def _bias_token_id(key: str, vocab_size: int) -> int:
    if not _TOKEN_ID_KEY.fullmatch(key):
        message = f'logit_bias keys must be token ids (integers written as strings, like "42"), got {key!r}'
        raise APIError(400, message, "logit_bias")
    token_id = int(key)
    if not 0 <= token_id < vocab_size:
        raise APIError(400, f"logit_bias token id {token_id} is outside [0, {vocab_size})", "logit_bias")
    return token_id


def _checked_bias(key: str, bias: float) -> float:
    if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
        message = f"logit_bias of token {key} is {bias}; biases must be in [-100, 100]"
        raise APIError(400, message, "logit_bias")
    return bias


def _field_of(message: str) -> str | None:
    name = message.split("=", 1)[0]
    return name if name.isidentifier() else None


def chat_max_tokens(request: ChatCompletionRequest) -> int | None:
    return request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens


def chat_logprobs(request: ChatCompletionRequest) -> int | None:
    return (request.top_logprobs or 0) if request.logprobs else None


def completion_logprobs(request: CompletionRequest) -> int | None:
    if request.logprobs is not None and request.echo:
        raise APIError(400, "logprobs together with echo is not supported (no prompt logprobs)", "echo")
    return request.logprobs


def check_context(
    num_prompt_tokens: int, max_new_tokens: int | None, session_len: int, prompt_param: str
) -> None:
    """400 context_length_exceeded when prompt (+ max_tokens) does not fit the session."""
    if num_prompt_tokens >= session_len:
        message = (
            f"This model's maximum context length is {session_len} tokens, "
            f"but the prompt has {num_prompt_tokens} tokens. Please shorten the prompt."
        )
        raise APIError(400, message, prompt_param, "context_length_exceeded")
    if max_new_tokens is not None and num_prompt_tokens + max_new_tokens > session_len:
        message = (
            f"This model's maximum context length is {session_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_new_tokens} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_new_tokens} for the completion). Please reduce the prompt or max_tokens."
        )
        raise APIError(400, message, "max_tokens", "context_length_exceeded")
