"""FrontEnd: deltas that wait for a slow reader join into one, and the text is the same however tokens arrive."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lmserve.engine.front_end import FrontEnd
from lmserve.engine.limits import EngineLimits
from lmserve.engine.messages import CoreOutput, EngineStats
from lmserve.generation import GenerationConfig, RequestOutput
from lmserve.models.loader import resolve_model
from lmserve.models.tokenizer import load_tokenizer

TEXT = "北京是中国的首都。🎉 Paris is the capital of France! 😀👍🏽 naïve café"


class ScriptedCore(FrontEnd):
    """A FrontEnd whose "core" is the test: it records what the front end sends and pushes outputs by hand."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.limits = EngineLimits(
            session_len=4096, num_blocks=64, block_size=64, vocab_size=tokenizer.vocab_size
        )
        self.default_generation_config = GenerationConfig()
        self.submitted: list[str] = []
        self.aborted: list[str] = []

    def _submit(self, request_id: str, prompt_token_ids: list[int], gen_config: GenerationConfig) -> None:
        self.submitted.append(request_id)

    def _abort_in_core(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def is_alive(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 64, 64, 0.0, 0, 0, 0, 0)

    def push(self, request_id: str, token_ids: list[int], finish_reason: Any = None) -> None:
        self._dispatch([CoreOutput(request_id, token_ids, None, finish_reason, 3, 0)])


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(resolve_model(None))


async def collect(front: ScriptedCore, feed: Any, config: GenerationConfig) -> list[RequestOutput]:
    """Start a stream, let `feed(request_id)` push outputs (all before the reader wakes), read it to the end."""
    stream = front.generate([1, 2, 3], config, request_id="r")
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)  # the request is submitted and the reader waits
    feed("r")
    outputs = [await first]
    async for out in stream:
        outputs.append(out)
    return outputs


def test_waiting_deltas_join_into_one_with_the_same_text(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    config = GenerationConfig(max_new_tokens=len(ids))

    def all_at_once(request_id: str) -> None:
        front.push(request_id, ids[:-1])  # tokens one at a time, as the core sends them, before any read
        front.push(request_id, ids[-1:], "length")

    def one_by_one(request_id: str) -> None:
        for token_id in ids[:-1]:
            front.push(request_id, [token_id])
        front.push(request_id, ids[-1:], "length")

    front = ScriptedCore(tokenizer)
    joined = asyncio.run(collect(front, all_at_once, config))
    front = ScriptedCore(tokenizer)
    split = asyncio.run(collect(front, one_by_one, config))
    assert len(joined) == 1 and len(split) == 1  # nothing was read in between: one delta either way
    assert joined[0].text == split[0].text == tokenizer.decode(ids)
    assert joined[0].token_ids == ids and joined[0].num_generated_tokens == len(ids)
    assert joined[0].finish_reason == "length" and not front.aborted  # the core ended it: nothing to abort


def test_deltas_read_as_they_come_give_the_same_text(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    front = ScriptedCore(tokenizer)

    async def read_each() -> list[RequestOutput]:
        stream = front.generate([1, 2, 3], GenerationConfig(max_new_tokens=len(ids)), request_id="r")
        outputs = []
        pending = asyncio.ensure_future(stream.__anext__())
        for index, token_id in enumerate(ids):
            await asyncio.sleep(0)
            front.push("r", [token_id], "length" if index == len(ids) - 1 else None)
            outputs.append(await pending)
            if index < len(ids) - 1:
                pending = asyncio.ensure_future(stream.__anext__())
        return outputs

    outputs = asyncio.run(read_each())
    assert len(outputs) == len(ids)
    assert "".join(out.text for out in outputs) == tokenizer.decode(ids)


def test_stop_string_in_a_joined_delta_cuts_tokens_and_aborts_the_core(tokenizer: Any) -> None:
    ids = tokenizer.encode(" one two three four five six", add_special_tokens=False)
    config = GenerationConfig(max_new_tokens=len(ids), stop_words=("four",))
    front = ScriptedCore(tokenizer)
    outputs = asyncio.run(collect(front, lambda request_id: front.push(request_id, ids), config))
    assert [out.text for out in outputs] == [" one two three "]
    assert outputs[-1].finish_reason == "stop"
    stop_index = ids.index(tokenizer.encode(" four", add_special_tokens=False)[0])
    assert outputs[-1].token_ids == ids[: stop_index + 1]  # usage ends at the token that completed "four"
    assert front.aborted == ["r"]  # the core is still generating: the front end ends it


@pytest.mark.parametrize(("bad_request", "raised"), [(True, ValueError), (False, RuntimeError)])
def test_a_core_error_is_the_requests_fault_only_when_the_core_says_so(
    tokenizer: Any, bad_request: bool, raised: type[Exception]
) -> None:
    """A request the core refused (its grammar did not compile) is a ValueError (the server's 400);
    an engine failure stays a RuntimeError (500)."""

    async def run() -> None:
        front = ScriptedCore(tokenizer)
        stream = front.generate([1, 2, 3], GenerationConfig(max_new_tokens=4), request_id="r")
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        front._dispatch([CoreOutput("r", [], None, "error", 3, 0, "no grammar", bad_request=bad_request)])
        with pytest.raises(raised, match="no grammar"):
            await first

    asyncio.run(run())
