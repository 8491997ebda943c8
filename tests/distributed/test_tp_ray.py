"""--distributed-executor-backend ray: rank 1 as a Ray actor in a placement group (ray.init(num_cpus=2) on
loopback); tp=2 greedy tokens and logprobs equal tp=1's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from tests.engine.test_model_folders import bpe_tokenizer, save_hf_folder

ray = pytest.importorskip("ray")

LOGPROB_ATOL = 1e-3
GREEDY = GenerationConfig(max_new_tokens=10, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-ray-llama")
    save_hf_folder(folder, "qwen2", bpe_tokenizer(), initializer_range=0.2)
    return folder


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def greedy(folder: Path, **options: object) -> tuple[list[list[int]], list[list[float]]]:
    config = EngineConfig(device="cpu", dtype="float32", session_len=128, max_batch_size=4, **options)
    engine = LLMEngine.from_pretrained(str(folder), config)
    try:
        ids = [engine.add_request(prompt, GREEDY) for prompt in ([5, 17, 42, 9], [250, 3])]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        logprobs: dict[str, list[float]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
                logprobs[out.request_id] += [entry.logprob for entry in out.logprobs or []]
    finally:
        engine.shutdown()
    return [tokens[i] for i in ids], [logprobs[i] for i in ids]


def test_ray_tp2_equals_tp1(model_folder: Path, local_ray: None) -> None:
    tokens1, logprobs1 = greedy(model_folder)
    tokens2, logprobs2 = greedy(model_folder, tp=2, distributed_executor_backend="ray")
    assert tokens2 == tokens1
    assert all(len(set(t)) > 2 for t in tokens1), "degenerate tokens would make this comparison weak"
    for ours, theirs in zip(logprobs2, logprobs1, strict=True):
        assert len(ours) == len(theirs) == GREEDY.max_new_tokens
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < LOGPROB_ATOL
