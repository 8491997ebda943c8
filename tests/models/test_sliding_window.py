"""Sliding-window attention: Mistral (every layer) and Gemma 3 (local and global layers) logits vs HF, and the
torch backend against the dense reference on paged batches whose windows start mid-block."""

from __future__ import annotations

import pytest
import torch

from lmserve.attention.kv_quant import TritonQuantKVBackend
from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.kernels.decode_attention import attend, gather_context
from lmserve.kernels.testing import backend_step, make_paged_batch
from lmserve.models.config import ModelConfig
from lmserve.models.registry import build_model
from tests.models.model_helpers import hf_config_dict
from tests.models.sliding_helpers import SCENARIOS, WINDOW, check_scenario, tiny_model
from tests.models.test_model_logits import build_ours

ATOL = 1e-4  # float32 end to end; differences are summation order only


@pytest.fixture(scope="module", params=["mistral_window", "gemma3"])
def models(request: pytest.FixtureRequest):
    hf = tiny_model(request.param)
    return hf, build_ours(hf)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_windowed_model_matches_hf(models, scenario: str) -> None:
    check_scenario(*models, scenario, ATOL)


def test_window_changes_the_logits() -> None:
    """The same weights without the window give other logits: the tests above would catch an ignored window."""
    from tests.models.model_helpers import hf_logits
    from tests.models.test_model_logits import new_cache, prompt, run_step

    hf = tiny_model("mistral_window")
    config = ModelConfig.from_hf_config({**hf_config_dict(hf), "sliding_window": None})
    ours = build_model(config, TorchAttentionBackend(), torch.float32, torch.device("cpu"))
    ours.load_weights(hf.state_dict().items())
    caches, paged = new_cache(ours)
    tokens = prompt(1, 23)
    assert (run_step(ours, caches, paged, [("a", tokens)]) - hf_logits(hf, tokens)).abs().max() > 1e-2


@pytest.mark.parametrize("window", [1, 3, WINDOW, 8, 64])
def test_torch_backend_window_matches_dense_reference(window: int) -> None:
    """Decodes and prefill chunks (with cached prefixes) of a paged batch against attend() over every key."""
    batch = make_paged_batch([1, 1, 7, 13], [6, 22, 18, 13], 4, 2, 16, 4, torch.float32, "cpu")
    cache = batch.layer_cache.clone()
    out = backend_step(TorchAttentionBackend(), batch.q, batch.k, batch.v, cache, batch.meta, 0.25, window)
    starts, lens = batch.meta.query_start_loc.tolist(), batch.meta.seq_lens.tolist()
    for seq in range(batch.meta.num_seqs):
        keys, values = gather_context(cache[0], cache[1], batch.meta.block_tables[seq], lens[seq])
        begin, end = starts[seq], starts[seq + 1]
        want = attend(batch.q[begin:end], keys, values, 0.25, lens[seq] - (end - begin), window)
        torch.testing.assert_close(out[begin:end], want, atol=1e-5, rtol=0)


def test_quantized_triton_backend_refuses_windowed_models() -> None:
    config = ModelConfig.from_hf_config(hf_config_dict(tiny_model("mistral_window")))
    with pytest.raises(ValueError, match="sliding-window.*--quant-policy 0"):
        build_model(config, TritonQuantKVBackend(8), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_engine_greedy_matches_hf_with_window(models, prefix_caching: bool) -> None:
    """The whole engine: a 16-token budget chunks prompts and mixes decodes with prefill chunks; with prefix
    caching the second round of prompts shares the first round's blocks."""
    from tests.engine.test_engine_tiny import GREEDY, hf_greedy, make_engine, random_prompts, run_all

    hf = models[0]
    engine = make_engine(
        hf,
        cache_block_seq_len=4,
        max_prefill_token_num=16,
        session_len=128,
        enable_prefix_caching=prefix_caching,
    )
    shared = random_prompts(1, hf.config.vocab_size, seed=5, low=21, high=21)[0]
    prompts = [shared + p for p in random_prompts(3, hf.config.vocab_size, seed=6, low=2, high=9)]
    expected = [hf_greedy(hf, p, GREEDY.max_new_tokens or 0) for p in prompts]
    assert run_all(engine, prompts[:1]) == expected[:1]
    assert run_all(engine, prompts[1:]) == expected[1:]
    assert (engine.stats().prefix_cache_hits > 0) == prefix_caching


def test_torch_quantized_backend_applies_the_window() -> None:
    """int8 KV on the CPU: close to the plain backend with the same window, far from it without one."""
    from lmserve.attention.kv_quant import TorchQuantKVBackend
    from lmserve.kernels.testing import relative_error
    from tests.unit.test_kv_quant import quantized

    batch = make_paged_batch([1, 1, 30, 7], [5, 70, 30, 50], 6, 2, 32, 8, torch.float32, "cpu")
    backend = TorchQuantKVBackend(8)
    out = backend_step(backend, batch.q, batch.k, batch.v, quantized(batch, 8), batch.meta, 0.2, WINDOW)
    meta, args = batch.meta, (batch.q, batch.k, batch.v)
    plain = backend_step(TorchAttentionBackend(), *args, batch.layer_cache.clone(), meta, 0.2, WINDOW)
    unwindowed = backend_step(TorchAttentionBackend(), *args, batch.layer_cache.clone(), meta, 0.2)
    assert relative_error(out, plain) < 0.01 < relative_error(out, unwindowed)
