"""Embeddings on CUDA (Triton attention, CUDA graphs for the decodes beside them) vs HF on the GPU."""

from __future__ import annotations

import pytest
import torch

from lmserve.generation import GenerationConfig
from lmserve.pipeline import Pipeline
from tests.engine.test_embeddings_tiny import hf_embedding, prompts
from tests.gpu.test_engine_cuda import make_engine
from tests.models.model_helpers import tiny_hf_model

# float32 on both sides; Triton's attention adds in another order than HF's SDPA
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_qwen2() -> torch.nn.Module:
    return tiny_hf_model("qwen2").to("cuda")


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_chunked_embeddings_equal_hf_on_cuda(hf_qwen2: torch.nn.Module, pooling: str) -> None:
    engine = make_engine(hf_qwen2, torch.float32, pooling=pooling, max_prefill_token_num=16)
    batch = prompts(0, [1, 5, 16, 17, 40], hf_qwen2.config.vocab_size)
    embeddings = Pipeline(engine=engine).embed(batch)
    for ids, embedding in zip(batch, embeddings, strict=True):
        expected = hf_embedding(hf_qwen2, ids, pooling).cpu()
        torch.testing.assert_close(torch.tensor(embedding), expected, atol=ATOL, rtol=0)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_one_token_embeddings_ride_along_graph_decodes(hf_qwen2: torch.nn.Module) -> None:
    # one-token inputs are scheduled with the decodes, so decode-only steps that replay a CUDA graph carry them
    engine = make_engine(hf_qwen2, torch.float32)
    vocab = hf_qwen2.config.vocab_size
    greedy = GenerationConfig(max_new_tokens=8, ignore_eos=True, do_sample=False)
    gen_id = engine.add_request(prompts(1, [12], vocab)[0], greedy)
    engine.step()
    singles = prompts(2, [1, 1, 1], vocab)
    embed_ids = [engine.add_embedding_request(ids) for ids in singles]
    embeddings: dict[str, list[float]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.embedding is not None:
                embeddings[out.request_id] = out.embedding
    assert gen_id not in embeddings
    for request_id, ids in zip(embed_ids, singles, strict=True):
        expected = hf_embedding(hf_qwen2, ids, "last").cpu()
        torch.testing.assert_close(torch.tensor(embeddings[request_id]), expected, atol=ATOL, rtol=0)
