"""EngineClient: what the server needs of an engine (AsyncEngine, or the tests' fake), torch-free."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lmserve.generation import GenerationConfig, RequestOutput


@runtime_checkable
class ChatTokenizer(Protocol):
    """The part of lmserve.models.tokenizer.Tokenizer that the server uses."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Render the chat template (with the generation prompt) and encode it without a second BOS."""
        ...


class EngineLoad(Protocol):
    """The engine statistics the /metrics gauges show (lmserve.engine.engine.EngineStats has them)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float: ...

    @property
    def prefix_cache_queries(self) -> int: ...

    @property
    def prefix_cache_hits(self) -> int: ...


@runtime_checkable
class EngineClient(Protocol):
    """An engine as the server sees it: AsyncEngine (core on a thread) or CoreClient (core in its own process)."""

    @property
    def tokenizer(self) -> ChatTokenizer: ...

    @property
    def session_len(self) -> int:
        """Most tokens (prompt + output) one request may hold."""
        ...

    @property
    def default_generation_config(self) -> GenerationConfig:
        """The model's sampling defaults, under the request's own fields."""
        ...

    def generate(
        self, prompt_token_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's output deltas; ValueError before the first for a bad request."""
        ...

    async def embed(self, prompt_token_ids: list[int], request_id: str | None = None) -> list[float]:
        """The prompt's pooled, L2-normalized last hidden state; ValueError for a prompt that cannot be embedded."""
        ...

    def abort(self, request_id: str) -> None: ...

    def is_alive(self) -> bool: ...

    def stats(self) -> EngineLoad: ...


# mypy proves the real classes satisfy the Protocols; importing them at run time would pull torch
if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.engine.core_client import CoreClient
    from lmserve.engine.messages import EngineStats
    from lmserve.models.tokenizer import Tokenizer

    def _async_engine_is_an_engine_client(engine: AsyncEngine) -> EngineClient:
        return engine

    def _core_client_is_an_engine_client(engine: CoreClient) -> EngineClient:
        return engine

    def _tokenizer_is_a_chat_tokenizer(tokenizer: Tokenizer) -> ChatTokenizer:
        return tokenizer

    def _engine_stats_are_an_engine_load(stats: EngineStats) -> EngineLoad:
        return stats
