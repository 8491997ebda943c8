"""Tensor parallelism on CUDA (NCCL, needs 2 GPUs): tp=2 greedy tokens equal tp=1 with CUDA graphs capturing
the all-reduce, graphs equal eager at tp=2, both ranks size the same KV cache; the same for Mixtral and Qwen3-MoE
(experts sharded, the fused MoE kernel on each rank's shard)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from tests.engine.test_model_folders import bpe_tokenizer, save_hf_folder
from tests.models.test_moe_models import tiny_moe_model

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
GREEDY = GenerationConfig(max_new_tokens=24, ignore_eos=True, do_sample=False)
PROMPTS = [[5, 17, 42, 9, 60], [50, 3], [7] * 40]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tp-cuda")
    save_hf_folder(folder, "llama", bpe_tokenizer(), initializer_range=0.2)
    return folder


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe_dense_layers"])
def moe_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny-tp-cuda-{request.param}")
    tiny_moe_model(request.param).save_pretrained(folder)  # vocabulary 97: PROMPTS stay below it
    bpe_tokenizer().save_pretrained(folder)
    return folder


def greedy(folder: Path, **options: object) -> tuple[list[list[int]], int]:
    config = EngineConfig(
        device="cuda", dtype="float32", max_batch_size=8, cache_max_entry_count=0.2, **options
    )
    engine = LLMEngine.from_pretrained(str(folder), config)  # type: ignore[arg-type]
    try:
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
        return [tokens[i] for i in ids], engine.block_manager.num_blocks
    finally:
        engine.shutdown()


def test_tp2_graphs_and_eager_equal_tp1(folder: Path) -> None:
    assert_tp2_equals_tp1(folder)


def test_moe_tp2_graphs_and_eager_equal_tp1(moe_folder: Path) -> None:
    assert_tp2_equals_tp1(moe_folder)


def assert_tp2_equals_tp1(folder: Path) -> None:
    tp1, _ = greedy(folder)
    tp2_graphs, num_blocks = greedy(folder, tp=2)
    tp2_eager, _ = greedy(folder, tp=2, eager_mode=True)
    assert tp2_graphs == tp1
    assert tp2_eager == tp1
    assert num_blocks > 0


def test_tp_above_the_gpus_present_is_refused(folder: Path) -> None:
    tp = torch.cuda.device_count() * 2
    with pytest.raises(ValueError, match=f"--tp {tp} needs {tp} GPUs"):
        LLMEngine.from_pretrained(str(folder), EngineConfig(device="cuda", tp=tp))
