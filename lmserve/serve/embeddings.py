"""POST /v1/embeddings: OpenAI's embeddings, each input one pooling request through the engine core."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lmserve.serve.errors import APIError, internal_error
from lmserve.serve.protocol import ErrorResponse, RequestModel, random_id
from lmserve.serve.state import ServerState, get_state
from lmserve.serve.streams import unless_disconnected

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500)}

EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]


class EmbeddingRequest(RequestModel):
    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    """Matryoshka truncation (OpenAI's text-embedding-3): no model we load is trained for it, so refused."""
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    """Pooled (--pooling), L2-normalized last hidden states of each input, in order."""
    state = get_state(request)
    state.check_model(body.model)
    if state.adapter_of(body.model) is not None:
        raise APIError(
            400,
            f"embeddings of a LoRA adapter ({body.model!r}) are not supported; use the base model",
            "model",
        )
    if body.dimensions is not None:
        message = "dimensions is not supported: this model's embeddings cannot be shortened (no Matryoshka training)"
        raise APIError(400, message, "dimensions")
    inputs = input_token_ids(state, body.input, body.user)
    api_id = random_id("embd-")
    async with state.slot():
        vectors = await unless_disconnected(request, _embed_all(state, api_id, inputs))
    data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    num_tokens = sum(len(ids) for ids in inputs)
    usage = EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens)
    response = EmbeddingResponse(data=data, model=state.config.model_name, usage=usage)
    return JSONResponse(response.model_dump())


def input_token_ids(state: ServerState, given: EmbeddingInput, user: str | None) -> list[list[int]]:
    """OpenAI's four input shapes as token-id lists; 400 naming `input` for an empty, unknown or long one."""
    if isinstance(given, str) or (given and all(isinstance(x, int) for x in given)):
        items: list[Any] = [given]
    else:
        items = list(given)
    if not items:
        raise APIError(400, "input must not be empty", "input")
    tokenizer = state.engine.tokenizer
    ids = [list(tokenizer.encode(x)) if isinstance(x, str) else list(x) for x in items]
    for index, item_ids in enumerate(ids):
        _check_input(item_ids, index, tokenizer.vocab_size, state.engine.session_len)
    state.log_prompt("embedding", str(items), user)
    return ids


def _check_input(ids: list[int], index: int, vocab_size: int, session_len: int) -> None:
    if not ids:
        raise APIError(400, f"input {index} is empty", "input")
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"input {index} has token ids outside [0, {vocab_size})", "input")
    if len(ids) > session_len:
        message = (
            f"This model's maximum context length is {session_len} tokens, "
            f"but input {index} has {len(ids)} tokens. Please shorten the input."
        )
        raise APIError(400, message, "input", "context_length_exceeded")


async def _embed_all(state: ServerState, api_id: str, inputs: list[list[int]]) -> list[list[float]]:
    """All inputs at once: the scheduler batches their prefills into the same steps."""
    engine_ids = [f"{api_id}-{i}" for i in range(len(inputs))]
    state.in_flight.add(api_id, engine_ids)
    tasks = [
        asyncio.create_task(state.engine.embed(ids, engine_id))
        for ids, engine_id in zip(inputs, engine_ids, strict=True)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except ValueError as error:  # the engine's verdict on an input (e.g. bigger than the KV cache)
        raise APIError(400, str(error), "input") from error
    except RuntimeError as error:
        raise internal_error(api_id, error) from error
    finally:
        for task in tasks:  # one input failed or the client left: the others stop too
            task.cancel()
        state.in_flight.remove(api_id)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    # OpenAI's base64: the little-endian float32 bytes (the openai client reads them with numpy)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
