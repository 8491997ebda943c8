"""A tiny stand-in for AsyncEngine (byte tokenizer, scripted text) to test the HTTP layer without a model.

FakeEngine satisfies lmserve.engine.client.EngineClient and ByteTokenizer the interface of
lmserve.models.tokenizer.Tokenizer; test_engine_client.py checks both, with mypy and at run time.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmserve.generation import GenerationConfig, RequestOutput, TokenLogprob

GREEDY_TEXT = "The capital of France is Paris. It is a beautiful city."
EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, then EOS; a chat template of <role> tags."""

    eos_token_ids = (EOS,)
    bos_token_id = None
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if i < 256)
        text = data.decode(errors="replace")
        return text if skip_special_tokens or EOS not in ids else text + "</s>"

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        body = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class FakeEngine:
    def __init__(self, session_len: int = 256, step_seconds: float = 0.001) -> None:
        self.tokenizer = ByteTokenizer()
        self.session_len = session_len
        self.default_generation_config = GenerationConfig()
        self.step_seconds = step_seconds
        self.running: set[str] = set()
        self.aborted: set[str] = set()
        self.alive = True
        self.configs: list[GenerationConfig] = []

    async def embed(self, prompt_token_ids: list[int], request_id: str | None = None) -> list[float]:
        """A unit vector from the prompt's byte counts: enough for the wire-format tests."""
        if len(prompt_token_ids) > self.session_len:
            raise ValueError(f"input of {len(prompt_token_ids)} tokens is longer than session_len")
        counts = [float(prompt_token_ids.count(b)) for b in range(8)] + [1.0]
        norm = math.sqrt(sum(c * c for c in counts))
        return [c / norm for c in counts]

    async def generate(
        self, prompt_token_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        if len(prompt_token_ids) >= self.session_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens is longer than session_len={self.session_len}"
            )
        rid = request_id or "r"
        self.configs.append(gen_config)
        self.running.add(rid)
        try:
            async for out in self._steps(rid, prompt_token_ids, gen_config):
                yield out
        finally:
            self.running.discard(rid)

    async def _steps(
        self, rid: str, prompt: list[int], config: GenerationConfig
    ) -> AsyncIterator[RequestOutput]:
        rng = random.Random(config.random_seed)
        limit = config.max_new_tokens or (self.session_len - len(prompt))
        text = ""
        for n in range(1, limit + 1):
            await asyncio.sleep(self.step_seconds)
            if rid in self.aborted:
                yield self._out(rid, prompt, "", [], n - 1, "abort", None)
                return
            token = ord(GREEDY_TEXT[(n - 1) % len(GREEDY_TEXT)]) if config.greedy else rng.randrange(97, 123)
            piece = chr(token)
            text += piece
            stop = next((w for w in config.stop_words if text.endswith(w)), None)
            logprobs = (
                [TokenLogprob(token, -0.5, tuple((token + j, -0.5 - j) for j in range(config.logprobs)))]
                if config.logprobs is not None
                else None
            )
            if stop is not None:
                yield self._out(
                    rid,
                    prompt,
                    piece[: len(piece) - len(stop)] if len(stop) <= 1 else "",
                    [token],
                    n,
                    "stop",
                    logprobs,
                )
                return
            reason = "length" if n == limit else None
            yield self._out(rid, prompt, piece, [token], n, reason, logprobs)
            if reason:
                return

    @staticmethod
    def _out(
        rid: str,
        prompt: list[int],
        text: str,
        ids: list[int],
        n: int,
        reason: str | None,
        lps: list[TokenLogprob] | None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=rid,
            text=text,
            token_ids=ids,
            logprobs=lps,
            finished=reason is not None,
            finish_reason=reason,  # type: ignore[arg-type]
            num_prompt_tokens=len(prompt),
            num_generated_tokens=n,
        )

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)

    def is_alive(self) -> bool:
        return self.alive

    def stats(self) -> FakeStats:
        return FakeStats(len(self.running), 0, 100, 100 - len(self.running), len(self.running) / 100)

    def shutdown(self) -> None:
        self.alive = False


if TYPE_CHECKING:  # what `mypy tests/serve/fake_engine.py` proves (test_engine_client.py runs it)
    from lmserve.engine.client import ChatTokenizer, EngineClient

    def _fake_engine_is_an_engine_client(engine: FakeEngine) -> EngineClient:
        return engine

    def _byte_tokenizer_is_a_chat_tokenizer(tokenizer: ByteTokenizer) -> ChatTokenizer:
        return tokenizer
