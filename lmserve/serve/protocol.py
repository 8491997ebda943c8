"""Pydantic models of the OpenAI wire format: requests with OpenAI's ranges, responses, encode/abort."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RequestModel(BaseModel):
    """Base of every request model: strict JSON types, finite numbers, valid Unicode in every string."""

    # Unknown fields are ignored (OpenAI clients send new ones all the time); fields we know but
    # cannot honour are rejected by check_supported() in sampling.py.
    # strict: "yes" is no boolean and "5" no integer (OpenAI's API is as strict); allow_inf_nan:
    # JSON's Infinity/NaN literals (and 1e400, which parses to inf) are no numbers.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _text_and_numbers_are_valid(cls, value: Any) -> Any:
        problem = first_invalid_value(value)
        if problem is not None:
            raise PydanticCustomError("invalid_value", problem)
        return value


def first_invalid_value(value: Any) -> str | None:
    """What is wrong inside a validated field value (text, lists, dicts, JSON held as Any), or None.

    Strings with lone surrogates (JSON's "\\ud800", CESU-8 bytes) cannot be encoded to UTF-8, so the
    tokenizer and the response writer would fail on them. Iterative, as JSON held as Any may nest deep.
    Nested models are skipped: their own fields ran this check, naming the inner field.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and not _encodes_as_utf8(item):
                return "text must be valid Unicode (it holds a lone surrogate)"
        elif isinstance(item, float) and not math.isfinite(item):
            return "numbers must be finite"
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ContentPart(RequestModel):
    """One part of a message's content list; only `text` parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls: [{id, type: function, function: {name, arguments (JSON text)}}]."""
    tool_call_id: str | None = None
    """A tool message: which call it answers."""


class StreamOptions(RequestModel):
    include_usage: bool = False


class ResponseFormat(RequestModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"


class SamplingFields(RequestModel):
    """Fields shared by chat and completions requests (OpenAI's plus LMDeploy's extras)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    """Bounded as vLLM does: the engine seeds a torch.Generator, which takes 64-bit seeds."""
    user: str | None = None
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    """Our bound (vLLM and LMDeploy only ask > 0): at 2 a seen token's positive logit is already halved,
    far past the 1.0-1.3 that model cards and the CTRL paper (1.2) use; 1e30 is a typo, not a setting."""
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_new_tokens: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)
    """vLLM's name for min_new_tokens."""
    logit_bias: dict[str, float] | None = None
    """OpenAI's token id (a JSON string key) -> bias in [-100, 100]; checked in sampling.py."""
    structured_outputs: dict[str, Any] | None = None
    """vLLM's: exactly one of json (schema), regex, choice (strings), grammar (EBNF), json_object."""
    regex_schema: str | None = None
    """LMDeploy's: the output matches this regex."""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1)
    """OpenAI's (and LMDeploy's) completions default is 16 tokens."""
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)


class EncodeRequest(RequestModel):
    """LMDeploy's /v1/encode: tokenize text (optionally as a chat user turn)."""

    input: Union[str, list[str]]
    do_preprocess: bool = False
    """Wrap the text in the chat template as one user message first."""
    add_bos: bool = True


class EncodeResponse(BaseModel):
    input_ids: Union[list[int], list[list[int]]]
    length: Union[int, list[int]]


class AbortRequest(RequestModel):
    request_id: str | None = None
    """An id returned by this server (chatcmpl-..., cmpl-...)."""
    abort_all: bool = False


class AbortResponse(BaseModel):
    aborted: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "lmserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[Any] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None
    refusal: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    """The <think> text with --reasoning-parser (LMDeploy's and SGLang's name) ..."""
    reasoning: str | None = None
    """... and under vLLM's newer name."""


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
