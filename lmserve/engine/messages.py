"""Messages between front ends and the engine-core process: small typed msgspec structs, never pickles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec

from lmserve.engine.limits import EngineLimits
from lmserve.generation import FinishReason, GenerationConfig, RequestOutput, TokenLogprob


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int


# -- front end -> core ------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    gen_config: GenerationConfig
    client_index: int
    """Which front end gets the outputs."""


class EmbedRequest(msgspec.Struct, tag="embed", array_like=True):
    """Embed a prompt: one prefill, pooled as the engine's --pooling says; no token sampled, no KV kept."""

    request_id: str
    prompt_token_ids: list[int]
    client_index: int


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


CoreRequest = Union[AddRequest, EmbedRequest, AbortRequests, Shutdown]


# -- core -> front end ------------------------------------------------------------------


class CoreOutput(msgspec.Struct, array_like=True):
    """One request's new tokens since the last message (text is made in the front end)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None = None
    embedding: list[float] | None = None
    bad_request: bool = False
    """The error is the request's fault (its front end answers 400), not the engine's."""


class CoreOutputs(msgspec.Struct, array_like=True):
    """Everything one step (or a heartbeat: no outputs) tells one front end, with the engine's stats."""

    outputs: list[CoreOutput]
    stats: EngineStats


class CoreReady(msgspec.Struct, array_like=True):
    """The core's first message: the model loaded (error is None) and the facts front ends need, or why not."""

    error: str | None
    limits: EngineLimits | None = None
    default_generation_config: GenerationConfig | None = None
    stats: EngineStats | None = None


def request_decoder() -> msgspec.msgpack.Decoder[CoreRequest]:
    return msgspec.msgpack.Decoder(CoreRequest)  # type: ignore[arg-type]


def outputs_decoder() -> msgspec.msgpack.Decoder[CoreOutputs]:
    return msgspec.msgpack.Decoder(CoreOutputs)


def ready_decoder() -> msgspec.msgpack.Decoder[CoreReady]:
    return msgspec.msgpack.Decoder(CoreReady)


def to_core_output(out: RequestOutput) -> CoreOutput:
    """The token part of an engine output (the text is made by the front end)."""
    return CoreOutput(
        out.request_id,
        out.token_ids,
        out.logprobs,
        out.finish_reason if out.finished else None,
        out.num_prompt_tokens,
        out.num_cached_tokens,
        out.error,
        out.embedding,
        out.bad_request,
    )
