"""What the routes of one app share: the engine, the config, metrics, in-flight requests, the concurrency limit."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from lmserve.config import ServeConfig
from lmserve.engine.client import EngineClient
from lmserve.serve.errors import APIError
from lmserve.serve.metrics import ServerMetrics
from lmserve.serve.streams import InFlight

logger = logging.getLogger("lmserve.serve")


@dataclass
class ServerState:
    engine: EngineClient
    config: ServeConfig
    metrics: ServerMetrics | None
    in_flight: InFlight = field(default_factory=InFlight)
    limiter: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.config.max_concurrent_requests:
            # excess requests wait their turn instead of being turned away
            self.limiter = asyncio.Semaphore(self.config.max_concurrent_requests)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._decode_token)

    def _decode_token(self, token_id: int) -> str:
        return str(self.engine.tokenizer.decode([token_id], skip_special_tokens=False))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of --max-concurrent-requests slots (no limit when unset)."""
        if self.limiter is None:
            yield
            return
        async with self.limiter:
            yield

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name and model not in self.config.adapters:
            served = ", ".join(f"`{name}`" for name in (self.config.model_name, *self.config.adapters))
            message = f"The model `{model}` does not exist. This server serves {served}."
            raise APIError(404, message, "model", "model_not_found")

    def adapter_of(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model)."""
        return model if model is not None and model in self.config.adapters else None

    def model_of(self, model: str | None) -> str:
        """The name a response reports: the adapter's when the request named one, else the served model's."""
        return self.adapter_of(model) or self.config.model_name

    def log_prompt(self, api_id: str, prompt: str, user: str | None) -> None:
        """Log the prompt with OpenAI's `user` (an end-user id, for abuse monitoring: all it is for)."""
        if logger.isEnabledFor(logging.INFO):
            limit = self.config.max_log_len
            logger.info("%s user=%r prompt=%r", api_id, user, prompt if limit is None else prompt[:limit])


def get_state(request: Request) -> ServerState:
    return request.app.state.lmserve  # type: ignore[no-any-return]
