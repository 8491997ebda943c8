"""LLMEngine with an int8 / int4 / fp8 KV cache (--quant-policy) on a tiny random Llama, against its float32 cache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from lmserve.attention.backend import get_attention_backend
from lmserve.attention.kv_quant import QuantizedKVCache
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.models.config import ModelConfig
from lmserve.models.registry import build_model
from tests.engine.test_engine_tiny import random_prompts, run_all
from tests.models.model_helpers import hf_config_dict, tiny_hf_model

GREEDY = GenerationConfig(max_new_tokens=16, ignore_eos=True, do_sample=False)
# int8's error (~0.5% per element) seldom flips a greedy choice: nearly every sequence stays identical;
# int4's (~10%) does flip them on this random model, so only its first new tokens are compared; fp8 e4m3 rounds
# each element to within 2^-4 (~3% RMS), between the two
MIN_IDENTICAL_SEQUENCES: dict[int | str, float] = {8: 7 / 8, 4: 0.0, "fp8": 0.5}
MIN_FIRST_TOKEN_AGREEMENT: dict[int | str, float] = {8: 1.0, 4: 0.75, "fp8": 0.75}


def make_engine(hf_model: PreTrainedModel, quant_policy: int | str, **config: object) -> LLMEngine:
    model_config = ModelConfig.from_hf_config(hf_config_dict(hf_model))
    cpu = torch.device("cpu")
    net: Any = build_model(model_config, get_attention_backend(cpu, quant_policy), torch.float32, cpu)
    net.load_weights(hf_model.state_dict().items())
    engine_config = EngineConfig(dtype="float32", device="cpu", quant_policy=quant_policy, **config)  # type: ignore[arg-type]
    return LLMEngine.build(engine_config, model_config, net)


@pytest.fixture(scope="module")
def hf_model() -> PreTrainedModel:
    # untied: a tiny tied Llama's greedy output only repeats the last prompt token, which tells little
    return tiny_hf_model("llama", tie_word_embeddings=False)


@pytest.mark.parametrize("quant_policy", [8, 4, "fp8"])
def test_greedy_tokens_mostly_match_float_cache(hf_model: PreTrainedModel, quant_policy: int | str) -> None:
    # a 16-token budget chunks prompts, so chunks attend to a quantized prefix and decodes mix with prefills
    config = dict(cache_block_seq_len=4, max_prefill_token_num=16, session_len=128)
    prompts = random_prompts(8, hf_model.config.vocab_size, seed=3)
    reference = run_all(make_engine(hf_model, 0, **config), prompts, GREEDY)
    engine = make_engine(hf_model, quant_policy, **config)
    cache = engine.runner.kv_caches[0]
    if quant_policy == "fp8":
        assert cache.dtype == torch.float8_e4m3fn
    else:
        assert isinstance(cache, QuantizedKVCache)
    tokens = run_all(engine, prompts, GREEDY)
    identical = sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(prompts)
    first_tokens = sum(a[0] == b[0] for a, b in zip(tokens, reference, strict=True)) / len(prompts)
    assert identical >= MIN_IDENTICAL_SEQUENCES[quant_policy]
    assert first_tokens >= MIN_FIRST_TOKEN_AGREEMENT[quant_policy]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_int8_batch_equals_each_request_alone(hf_model: PreTrainedModel) -> None:
    # quantization is per token: a sequence's cache does not depend on what else is in the batch
    prompts = random_prompts(5, hf_model.config.vocab_size, seed=4)
    together = run_all(make_engine(hf_model, 8, cache_block_seq_len=8, session_len=128), prompts, GREEDY)
    alone = [
        run_all(make_engine(hf_model, 8, cache_block_seq_len=8, session_len=128), [p], GREEDY)[0]
        for p in prompts
    ]
    assert together == alone


def test_fp8_prefix_cache_hits_give_the_same_tokens(hf_model: PreTrainedModel) -> None:
    """Prompts sharing whole blocks read the e4m3 blocks an earlier request stored instead of recomputing them."""
    config = dict(cache_block_seq_len=8, session_len=128)
    shared = random_prompts(1, hf_model.config.vocab_size, seed=6)[0][:8] * 3
    prompts = [shared + tail for tail in random_prompts(3, hf_model.config.vocab_size, seed=7)]
    plain = run_all(make_engine(hf_model, "fp8", **config), prompts, GREEDY)
    cached = make_engine(hf_model, "fp8", enable_prefix_caching=True, **config)
    first = run_all(cached, prompts[:1], GREEDY)
    assert first + run_all(cached, prompts[1:], GREEDY) == plain
    assert cached.stats().prefix_cache_hits > 0
