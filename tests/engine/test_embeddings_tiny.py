"""Pooling requests (embeddings) on tiny random models vs HF transformers' last hidden state, pooled the same way."""

from __future__ import annotations

import random

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.generation import GenerationConfig
from lmserve.pipeline import Pipeline
from tests.engine.test_engine_tiny import hf_greedy, make_engine
from tests.models.model_helpers import tiny_hf_model

# float32 on both sides; what differs is only the order of the additions (paged attention, chunking)
ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_qwen2() -> torch.nn.Module:
    return tiny_hf_model("qwen2")  # the architecture of gte-Qwen2, a decoder embedding model


@torch.no_grad()
def hf_embedding(hf_model: torch.nn.Module, ids: list[int], pooling: str) -> torch.Tensor:
    """HF's last_hidden_state (after the final norm, as `hidden_states[-1]`) pooled and L2-normalized."""
    hidden = hf_model.model(torch.tensor([ids], device=hf_model.device)).last_hidden_state[0]
    pooled = {"last": hidden[-1], "mean": hidden.mean(dim=0), "cls": hidden[0]}[pooling]
    return torch.nn.functional.normalize(pooled, dim=0)


def prompts(seed: int, lengths: list[int], vocab_size: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_chunked_batched_embeddings_equal_hf(hf_qwen2: torch.nn.Module, pooling: str) -> None:
    # a 16-token budget splits the longer prompts over several steps and batches chunks of different prompts
    engine = make_engine(hf_qwen2, pooling=pooling, max_prefill_token_num=16)
    batch = prompts(0, [1, 5, 16, 17, 40], hf_qwen2.config.vocab_size)
    embeddings = Pipeline(engine=engine).embed(batch)
    for ids, embedding in zip(batch, embeddings, strict=True):
        torch.testing.assert_close(
            torch.tensor(embedding), hf_embedding(hf_qwen2, ids, pooling), atol=ATOL, rtol=0
        )
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # no KV kept
    assert engine.block_manager.num_prefix_queries == 0 and not engine.requests


def test_single_input_gives_one_vector_and_token_ids_equal_a_batch(hf_qwen2: torch.nn.Module) -> None:
    pipe = Pipeline(engine=make_engine(hf_qwen2))
    ids = prompts(1, [9], hf_qwen2.config.vocab_size)[0]
    single = pipe.embed(ids)
    assert isinstance(single[0], float) and len(single) == hf_qwen2.config.hidden_size
    pair = pipe.embed([ids, ids])
    assert len(pair) == 2  # batched rows differ from a lone row only by the order of additions
    for embedding in pair:
        torch.testing.assert_close(torch.tensor(embedding), torch.tensor(single), atol=ATOL, rtol=0)


def test_embeddings_and_generation_share_steps(hf_qwen2: torch.nn.Module) -> None:
    engine = make_engine(hf_qwen2, max_prefill_token_num=24, enable_prefix_caching=True)
    vocab = hf_qwen2.config.vocab_size
    gen_prompt, embed_prompt = prompts(2, [11, 30], vocab)
    greedy = GenerationConfig(max_new_tokens=6, ignore_eos=True, do_sample=False)
    gen_id = engine.add_request(gen_prompt, greedy)
    embed_id = engine.add_embedding_request(embed_prompt)
    tokens: list[int] = []
    embedding = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == gen_id:
                tokens += out.token_ids
            elif out.request_id == embed_id and out.finished:
                assert not out.token_ids and out.num_prompt_tokens == len(embed_prompt)
                embedding = out.embedding
    assert tokens == hf_greedy(hf_qwen2, gen_prompt, 6)
    assert embedding is not None
    torch.testing.assert_close(
        torch.tensor(embedding), hf_embedding(hf_qwen2, embed_prompt, "last"), atol=ATOL, rtol=0
    )


def test_preempted_embedding_starts_its_pooling_over(hf_qwen2: torch.nn.Module) -> None:
    engine = make_engine(hf_qwen2, pooling="mean", max_prefill_token_num=16)
    ids = prompts(3, [40], hf_qwen2.config.vocab_size)[0]
    request_id = engine.add_embedding_request(ids)
    assert engine.step() == []  # 16 of 40 tokens pooled
    request = engine.requests[request_id]
    engine.scheduler._preempt(request, SchedulerOutput())  # as when a growing request needs its blocks
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [out.request_id for out in outputs] == [request_id]
    embedding = torch.tensor(outputs[0].embedding)
    torch.testing.assert_close(embedding, hf_embedding(hf_qwen2, ids, "mean"), atol=ATOL, rtol=0)


def test_bad_embedding_inputs_are_refused(hf_qwen2: torch.nn.Module) -> None:
    engine: LLMEngine = make_engine(hf_qwen2, session_len=32)
    with pytest.raises(ValueError, match="input is empty"):
        engine.add_embedding_request([])
    with pytest.raises(ValueError, match="33 tokens but this model's context"):
        engine.add_embedding_request([1] * 33)
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        engine.add_embedding_request([hf_qwen2.config.vocab_size])
    with pytest.raises(ValueError, match="pooling='max' must be one of"):
        EngineConfig(pooling="max")
