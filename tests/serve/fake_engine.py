"""A tiny stand-in for AsyncEngine (byte tokenizer, scripted text) to test the HTTP layer without a model."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lmserve.generation import GenerationConfig, RequestOutput, TokenLogprob

GREEDY_TEXT = "The capital of France is Paris. It is a beautiful city."
EOS = 256


class ByteTokenizer:
    eos_token_ids = (EOS,)
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if i < 256)
        text = data.decode(errors="replace")
        return text if skip_special_tokens or EOS not in ids else text + "</s>"

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kw: object
    ) -> str:
        body = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


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

    async def generate(
        self, prompt_token_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
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
